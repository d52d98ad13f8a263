//! Token usage: what one answer cost (read from the response's `usage`), the in-memory tally the
//! request path adds to, and `ccgate usage`, which prints the ledger the store keeps.
//!
//! **Invariant:** the request path only touches [`UsageTally::add`]: a short, bounded critical
//! section on an in-memory map. The store's writer takes the map once per flush interval and
//! writes it in its own transaction; nothing here does I/O for a request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use crate::config::{ProcessEnv, StorageConfig, resolve_config_path};
use crate::json_top;

/// Tokens of one answer (or a sum of answers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `input_tokens`.
    pub input: u64,
    /// `output_tokens`.
    pub output: u64,
    /// `cache_creation_input_tokens` (prompt-cache writes).
    pub cache_creation: u64,
    /// `cache_read_input_tokens` (prompt-cache hits).
    pub cache_read: u64,
}

impl Usage {
    fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_creation = self.cache_creation.saturating_add(other.cache_creation);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
    }

    /// Sets every field that `usage` (an Anthropic `usage` object) carries. Streams report
    /// cumulative values, so a later report replaces an earlier one field by field.
    pub fn update_from(&mut self, usage: &serde_json::Value) {
        let field = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
        if let Some(n) = field("input_tokens") {
            self.input = n;
        }
        if let Some(n) = field("output_tokens") {
            self.output = n;
        }
        if let Some(n) = field("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = field("cache_read_input_tokens") {
            self.cache_read = n;
        }
    }
}

/// What a response said about its cost: the model that answered and the tokens it counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageUsage {
    /// `model` of the message (`None` if the response did not say).
    pub model: Option<String>,
    /// Its tokens.
    pub usage: Usage,
}

/// The largest JSON body whose `usage` is read; larger bodies are relayed without a copy.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// The top-level `model` and `usage` of a non-streaming Messages response; `None` when the body
/// is not JSON or carries no `usage` object (a `count_tokens` or `models` answer, say).
pub fn from_json_body(body: &[u8]) -> Option<MessageUsage> {
    // Only these members are read; the content between them is stepped over, not parsed.
    // `usage` comes last in a Messages response, `model` near the front.
    let (mut usage, mut model) = (None, None);
    for (key, value) in json_top::members(body) {
        match key {
            b"usage" if usage.is_none() => usage = Some(value),
            b"model" if model.is_none() => model = Some(value),
            _ => {}
        }
        if usage.is_some() && model.is_some() {
            break;
        }
    }
    let usage = usage?;
    if usage.first() != Some(&b'{') {
        return None;
    }
    let mut tokens = Usage::default();
    for (key, value) in json_top::members(usage) {
        let field = match key {
            b"input_tokens" => &mut tokens.input,
            b"output_tokens" => &mut tokens.output,
            b"cache_creation_input_tokens" => &mut tokens.cache_creation,
            b"cache_read_input_tokens" => &mut tokens.cache_read,
            _ => continue,
        };
        *field = json_top::as_u64(value).unwrap_or(0);
    }
    Some(MessageUsage {
        model: model.and_then(json_top::as_str).map(String::from),
        usage: tokens,
    })
}

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
    rows: parking_lot::Mutex<HashMap<UsageKey, UsageSums>>,
}

/// Days since the Unix epoch, UTC.
pub fn day_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0))
}

impl UsageTally {
    /// Adds one answer's usage (request path: one short lock, no I/O).
    pub fn add(&self, endpoint: &str, usage: MessageUsage) {
        let model = match usage.model {
            Some(mut m) if !m.is_empty() => {
                if m.len() > MAX_MODEL_LEN {
                    m = m.chars().take(MAX_MODEL_LEN).collect();
                }
                m
            }
            _ => OTHER_MODEL.to_string(),
        };
        // The key is built before the lock is taken: only the map operations happen under it.
        let mut key = UsageKey {
            day: day_of(SystemTime::now()),
            endpoint: endpoint.to_string(),
            model,
        };
        let one = UsageSums {
            requests: 1,
            usage: usage.usage,
        };
        let mut rows = self.rows.lock();
        if rows.len() >= MAX_ROWS && !rows.contains_key(&key) {
            key.model = OTHER_MODEL.to_string();
        }
        rows.entry(key).or_default().add(&one);
    }

    /// Takes everything gathered so far.
    pub fn take(&self) -> HashMap<UsageKey, UsageSums> {
        std::mem::take(&mut *self.rows.lock())
    }

    /// Puts back rows a failed flush could not write.
    pub fn restore(&self, rows: HashMap<UsageKey, UsageSums>) {
        let mut mine = self.rows.lock();
        for (k, v) in rows {
            mine.entry(k).or_default().add(&v);
        }
    }
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01), proleptic Gregorian.
pub fn day_string(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------------------------
// `ccgate usage`

/// `ccgate usage`: the ledger of tokens per day, endpoint and model.
#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// Config file, for `[storage]` (default: $CCGATE_CONFIG, then ~/.config/ccgate/config.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Days to show, counting today (UTC).
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=36_500))]
    pub days: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the stored ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LedgerRow {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Model.
    pub model: String,
    /// Answers counted.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Prompt-cache writes.
    pub cache_creation_input_tokens: u64,
    /// Prompt-cache reads.
    pub cache_read_input_tokens: u64,
}

/// Runs `ccgate usage`: reads the database file directly (read-only; no gateway needed).
pub fn run(args: UsageArgs) -> anyhow::Result<()> {
    let storage = storage_config(args.config)?;
    let Some(path) = storage.resolved_path() else {
        anyhow::bail!("this platform has no data directory; set [storage] path in the config");
    };
    let today = day_of(SystemTime::now());
    let since = day_string(today - i64::from(args.days) + 1);
    let rows = if path.exists() {
        crate::store::read_ledger(&path, &since)
            .with_context(|| format!("cannot read the usage ledger in {}", path.display()))?
    } else {
        Vec::new()
    };
    let mut total = UsageSums::default();
    for r in &rows {
        total.add(&UsageSums {
            requests: r.requests,
            usage: Usage {
                input: r.input_tokens,
                output: r.output_tokens,
                cache_creation: r.cache_creation_input_tokens,
                cache_read: r.cache_read_input_tokens,
            },
        });
    }
    if args.json {
        let v = serde_json::json!({
            "database": path.display().to_string(),
            "since": since,
            "days": args.days,
            "rows": rows,
            "total": {
                "requests": total.requests,
                "input_tokens": total.usage.input,
                "output_tokens": total.usage.output,
                "cache_creation_input_tokens": total.usage.cache_creation,
                "cache_read_input_tokens": total.usage.cache_read,
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !path.exists() {
        println!(
            "no usage recorded yet: {} does not exist (the gateway creates it)",
            path.display()
        );
        return Ok(());
    }
    println!("usage since {since} (UTC), from {}", path.display());
    if rows.is_empty() {
        println!("\nno requests in these {} days", args.days);
        return Ok(());
    }
    let num = |n: u64| n.to_string();
    let mut table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.day.clone(),
                r.endpoint.clone(),
                r.model.clone(),
                num(r.requests),
                num(r.input_tokens),
                num(r.output_tokens),
                num(r.cache_creation_input_tokens),
                num(r.cache_read_input_tokens),
            ]
        })
        .collect();
    table.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        num(total.requests),
        num(total.usage.input),
        num(total.usage.output),
        num(total.usage.cache_creation),
        num(total.usage.cache_read),
    ]);
    println!();
    print!(
        "{}",
        crate::ops::table(
            &[
                "DAY",
                "ENDPOINT",
                "MODEL",
                "REQUESTS",
                "INPUT",
                "OUTPUT",
                "CACHE WRITE",
                "CACHE READ",
            ],
            &table,
        )
    );
    Ok(())
}

/// The `[storage]` settings: from `--config`, else `$CCGATE_CONFIG`, else the default config file
/// if it exists, else the defaults (see [`resolve_config_path`]). Only `[storage]` is read, so a
/// config whose credentials come from variables this shell does not have still works.
fn storage_config(explicit: Option<PathBuf>) -> anyhow::Result<StorageConfig> {
    let Some((path, chosen)) = resolve_config_path(explicit.as_deref(), &ProcessEnv) else {
        return Ok(StorageConfig::default());
    };
    if !path.exists() && !chosen {
        return Ok(StorageConfig::default());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(StorageConfig::from_toml(
        &text,
        &path.display().to_string(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_format_as_utc_dates() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(19_723), "2024-01-01");
        assert_eq!(day_string(19_782), "2024-02-29");
        assert_eq!(day_string(20_454), "2026-01-01");
        assert_eq!(day_string(-1), "1969-12-31");
    }

    #[test]
    fn json_body_usage_is_read() {
        let body = br#"{"id":"m","type":"message","model":"claude-x","content":[{"type":"text","text":"hi"}],
            "usage":{"input_tokens":12,"output_tokens":7,"cache_creation_input_tokens":3,"cache_read_input_tokens":null}}"#;
        let u = from_json_body(body).expect("usage");
        assert_eq!(u.model.as_deref(), Some("claude-x"));
        assert_eq!(
            u.usage,
            Usage {
                input: 12,
                output: 7,
                cache_creation: 3,
                cache_read: 0
            }
        );
        assert_eq!(from_json_body(br#"{"input_tokens": 5}"#), None);
        assert_eq!(from_json_body(b"not json"), None);
        assert_eq!(from_json_body(br#"{"usage": "weird"}"#), None);
        assert_eq!(from_json_body(br#"{"usage": null}"#), None);
        // A nested `usage` (a tool's input, say) is not the message's.
        assert_eq!(
            from_json_body(br#"{"content":[{"input":{"usage":{"input_tokens":1}}}]}"#),
            None
        );
        let no_model =
            from_json_body(br#"{"model":5,"usage":{"output_tokens":2}}"#).expect("usage");
        assert_eq!((no_model.model, no_model.usage.output), (None, 2));
    }

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
}
