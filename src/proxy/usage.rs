//! The in-memory usage tally the request path adds to: tokens per (UTC day, endpoint, model).
//!
//! **Invariant:** the request path only touches [`UsageTally::add`]: a short, bounded critical
//! section on an in-memory map. The store's writer takes the map once per flush interval and
//! writes it in its own transaction; nothing here does I/O for a request.

use std::time::SystemTime;

use hashbrown::{Equivalent, HashMap};

use crate::clock::day_of;
use crate::wire::usage::{MessageUsage, Usage};

/// One row of the ledger, in memory: endpoint, model and UTC day.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UsageKey {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// Endpoint name.
    pub endpoint: String,
    /// Model as the response named it.
    pub model: String,
}

/// A [`UsageKey`] made of borrowed parts, to find a row that exists without allocating its key.
/// Hashes as the owned key does: the derived `Hash` of both writes the same fields in the same
/// order, and a `&str` hashes as the `String` holding it.
#[derive(Hash)]
struct UsageKeyRef<'a> {
    day: i64,
    endpoint: &'a str,
    model: &'a str,
}

impl Equivalent<UsageKey> for UsageKeyRef<'_> {
    fn equivalent(&self, key: &UsageKey) -> bool {
        self.day == key.day && self.endpoint == key.endpoint && self.model == key.model
    }
}

/// The rows of a [`UsageTally`]: hashbrown's map, for lookups by [`UsageKeyRef`].
pub type UsageRows = HashMap<UsageKey, UsageSums>;

/// Requests and tokens of one ledger row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageSums {
    /// Answers counted.
    pub requests: u64,
    /// Their tokens.
    pub usage: Usage,
}

impl UsageSums {
    /// Adds `other`.
    pub fn add(&mut self, other: &UsageSums) {
        self.requests = self.requests.saturating_add(other.requests);
        self.usage.add(&other.usage);
    }
}

/// Rows one flush interval may gather before new models are folded into [`OTHER_MODEL`], so that
/// an upstream inventing model names cannot grow the map without bound.
const MAX_ROWS: usize = 10_000;
/// Longest model name kept, in characters (applied here, to the model of streams and JSON bodies
/// alike).
const MAX_MODEL_LEN: usize = 200;
/// The model name for usage without one, or beyond [`MAX_ROWS`].
pub const OTHER_MODEL: &str = "(other)";

/// Usage gathered since the store's last flush.
#[derive(Default)]
pub struct UsageTally {
    rows: parking_lot::Mutex<UsageRows>,
}

impl UsageTally {
    /// Adds one answer's usage (request path: one short lock, no I/O; a row that exists is
    /// found by borrowed parts, so only a new row allocates its key).
    pub fn add(&self, endpoint: &str, usage: MessageUsage) {
        let model = ledger_model(usage.model);
        let day = day_of(SystemTime::now());
        let one = UsageSums {
            requests: 1,
            usage: usage.usage,
        };
        let mut rows = self.rows.lock();
        let found = UsageKeyRef {
            day,
            endpoint,
            model: &model,
        };
        if let Some(sums) = rows.get_mut(&found) {
            sums.add(&one);
            return;
        }
        let model = if rows.len() >= MAX_ROWS {
            OTHER_MODEL.to_string()
        } else {
            model
        };
        let key = UsageKey {
            day,
            endpoint: endpoint.to_string(),
            model,
        };
        rows.entry(key).or_default().add(&one);
    }

    /// Takes everything gathered so far.
    pub fn take(&self) -> UsageRows {
        std::mem::take(&mut *self.rows.lock())
    }

    /// Puts back rows a failed flush could not write.
    pub fn restore(&self, rows: UsageRows) {
        let mut mine = self.rows.lock();
        for (k, v) in rows {
            mine.entry(k).or_default().add(&v);
        }
    }
}

/// Token usage since the process started, per (endpoint, model): the live prompt-cache figures
/// of the views and `/metrics`. Kept whether or not storage is on; bounded like the tally (new
/// models beyond [`MAX_ROWS`] fold into [`OTHER_MODEL`]). Shared by a gateway and its reloaded
/// successors, so a reload does not reset it.
#[derive(Default)]
pub struct LiveUsage {
    rows: parking_lot::Mutex<HashMap<(String, String), UsageSums>>,
}

/// An (endpoint, model) key of [`LiveUsage`] made of borrowed parts; hashes as the owned tuple.
#[derive(Hash)]
struct LiveKeyRef<'a>(&'a str, &'a str);

impl Equivalent<(String, String)> for LiveKeyRef<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

impl LiveUsage {
    /// Adds one answer's usage (request path: one short lock, no I/O; only a new row allocates
    /// its key).
    pub fn add(&self, endpoint: &str, model: &str, usage: &Usage) {
        let one = UsageSums {
            requests: 1,
            usage: *usage,
        };
        let mut rows = self.rows.lock();
        if let Some(sums) = rows.get_mut(&LiveKeyRef(endpoint, model)) {
            sums.add(&one);
            return;
        }
        let model = if rows.len() >= MAX_ROWS {
            OTHER_MODEL
        } else {
            model
        };
        rows.entry((endpoint.to_string(), model.to_string()))
            .or_default()
            .add(&one);
    }

    /// The sums of one endpoint, by model (sorted by model).
    pub fn of_endpoint(&self, endpoint: &str) -> Vec<(String, UsageSums)> {
        let mut out: Vec<(String, UsageSums)> = self
            .rows
            .lock()
            .iter()
            .filter(|((e, _), _)| e == endpoint)
            .map(|((_, m), v)| (m.clone(), *v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every row: (endpoint, model, sums), sorted.
    pub fn all(&self) -> Vec<(String, String, UsageSums)> {
        let mut out: Vec<(String, String, UsageSums)> = self
            .rows
            .lock()
            .iter()
            .map(|((e, m), v)| (e.clone(), m.clone(), *v))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

/// The prompt-cache hit rate of `usage`: `cache_read / (cache_read + cache_creation + input)`,
/// `None` when no input tokens were counted at all.
pub fn hit_rate(usage: &Usage) -> Option<f64> {
    let all = usage
        .cache_read
        .saturating_add(usage.cache_creation)
        .saturating_add(usage.input);
    (all > 0).then(|| usage.cache_read as f64 / all as f64)
}

/// A model name as the ledger keeps it: cut to [`MAX_MODEL_LEN`] characters, [`OTHER_MODEL`]
/// when the answer named none.
pub fn ledger_model(model: Option<String>) -> String {
    match model {
        Some(mut m) if !m.is_empty() => {
            if m.len() > MAX_MODEL_LEN {
                m = m.chars().take(MAX_MODEL_LEN).collect();
            }
            m
        }
        _ => OTHER_MODEL.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_sums_and_bounds_rows() {
        let t = UsageTally::default();
        let u = |m: &str| MessageUsage {
            model: Some(m.into()),
            usage: Usage {
                input: 1,
                output: 2,
                cache_creation: 0,
                cache_read: 4,
                ..Default::default()
            },
        };
        t.add("a", u("m"));
        t.add("a", u("m"));
        let long = "é".repeat(MAX_MODEL_LEN + 1);
        t.add("c", u(&long));
        for i in 0..MAX_ROWS + 5 {
            t.add("b", u(&format!("model-{i}")));
        }
        let rows = t.take();
        assert!(rows.len() <= MAX_ROWS + 1, "{}", rows.len());
        let a = rows
            .iter()
            .find(|(k, _)| k.endpoint == "a")
            .map(|(_, v)| *v)
            .expect("row a");
        assert_eq!(a.requests, 2);
        assert_eq!(a.usage.output, 4);
        let c = rows.keys().find(|k| k.endpoint == "c").expect("row c");
        assert_eq!(c.model, "é".repeat(MAX_MODEL_LEN));
        let b_requests: u64 = rows
            .iter()
            .filter(|(k, _)| k.endpoint == "b")
            .map(|(_, v)| v.requests)
            .sum();
        assert_eq!(b_requests, (MAX_ROWS + 5) as u64);
        assert!(t.take().is_empty());
    }

    #[test]
    fn borrowed_keys_hash_as_the_owned_ones() {
        use std::hash::BuildHasher;
        let rows = UsageRows::default();
        let owned = UsageKey {
            day: 20_000,
            endpoint: "a".into(),
            model: "m".into(),
        };
        let found = UsageKeyRef {
            day: 20_000,
            endpoint: "a",
            model: "m",
        };
        assert_eq!(
            rows.hasher().hash_one(&owned),
            rows.hasher().hash_one(&found)
        );
        let live: HashMap<(String, String), UsageSums> = HashMap::default();
        assert_eq!(
            live.hasher().hash_one(("a".to_string(), "m".to_string())),
            live.hasher().hash_one(LiveKeyRef("a", "m"))
        );
        // Split differently, the same bytes are another key.
        assert_ne!(
            live.hasher().hash_one(("am".to_string(), String::new())),
            live.hasher().hash_one(LiveKeyRef("a", "m"))
        );
    }

    #[test]
    fn live_usage_sums_rows_and_folds_models_beyond_the_bound() {
        let live = LiveUsage::default();
        let u = Usage {
            input: 1,
            output: 2,
            cache_creation: 0,
            cache_read: 4,
            ..Default::default()
        };
        live.add("a", "m", &u);
        live.add("a", "m", &u);
        for i in 0..MAX_ROWS + 3 {
            live.add("b", &format!("model-{i}"), &u);
        }
        let all = live.all();
        assert!(all.len() <= MAX_ROWS + 1, "{}", all.len());
        let a = live.of_endpoint("a");
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].1.requests, a[0].1.usage.cache_read), (2, 8));
        let other = all
            .iter()
            .find(|(e, m, _)| e == "b" && m == OTHER_MODEL)
            .expect("folded row");
        let b_requests: u64 = all
            .iter()
            .filter(|(e, _, _)| e == "b")
            .map(|r| r.2.requests)
            .sum();
        assert_eq!(b_requests, (MAX_ROWS + 3) as u64);
        assert!(other.2.requests >= 3);
    }
}
