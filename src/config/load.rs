//! Reading a configuration: TOML text to the raw mirror (unknown keys collected, every problem
//! located by line and dotted key), then validation.

use std::path::Path;

use serde::Deserialize;

use crate::config::Prices;
use crate::config::cluster::validate_cluster;
use crate::config::env::Env;
use crate::config::lenient;
use crate::config::prices::RawPrice;
use crate::config::problems::Problems;
use crate::config::raw::{RawConfig, RawStorage};
use crate::config::validate::{validate, validate_prices, validate_storage};
use crate::config::{Config, ConfigError, DEFAULT_BASE_URL, Problem, StorageConfig};

/// Largest configuration file read: a config is a few kilobytes, and a path to a device or a
/// runaway file must not take all memory.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// The text of the config file at `path`, refused past [`MAX_CONFIG_BYTES`]: how every reader of
/// a config file (a start, a reload, the CLI) reads it.
pub fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {} MiB",
            MAX_CONFIG_BYTES / 1024 / 1024
        )));
    }
    Ok(text)
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let source_name = path.display().to_string();
        let text = read_capped(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![Problem {
                line: None,
                key: "(file)".into(),
                message: format!("cannot read it: {e}"),
            }],
        })?;
        Self::from_toml(&text, &source_name, env)
    }

    /// Parses and validates configuration text; `source_name` names it in messages.
    pub fn from_toml(text: &str, source_name: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let mut p = Problems::new(text);
        // Unknown keys are collected rather than fatal, so that they are reported together with
        // every other problem.
        let mut unknown: Vec<Vec<String>> = Vec::new();
        // Values of the wrong type are collected too, and read as absent.
        let (parsed, wrong_types) = lenient::collect(|| {
            toml::Deserializer::parse(text).and_then(|de| {
                serde_ignored::deserialize(de, |path| unknown.push(path_segments(&path)))
            })
        });
        let raw: RawConfig = match parsed {
            Ok(raw) => raw,
            Err(e) => {
                parse_problem(&mut p, text, &e, "(syntax)");
                return Err(p.into_error(source_name));
            }
        };
        if !unknown.is_empty() || !wrong_types.is_empty() {
            let spans = toml::de::DeTable::parse(text).ok();
            for path in &unknown {
                let offset = spans.as_ref().and_then(|t| key_offset(t.get_ref(), path));
                p.at_line(offset.map(|o| p.line_of(o)), dotted(path), "unknown key");
            }
            for w in wrong_types {
                let key = spans
                    .as_ref()
                    .and_then(|t| path_at(t.get_ref(), w.span.start))
                    .map_or_else(|| "(value)".to_string(), |path| dotted(&path));
                p.at_line(Some(p.line_of(w.span.start)), key, w.message);
            }
        }
        let mut raw = raw;
        let cluster = raw.cluster.take();
        let mut config = validate(raw, &mut p, env);
        config.cluster = validate_cluster(&cluster, &mut p, env);
        p.list.sort_by_key(|pr| pr.line.unwrap_or(usize::MAX));
        p.finish(source_name, config)
    }

    /// The configuration used when there is no file: one endpoint from `ANTHROPIC_BASE_URL` and
    /// `ANTHROPIC_API_KEY` or `ANTHROPIC_AUTH_TOKEN`. `None` when neither credential is set.
    pub fn from_anthropic_env(env: &dyn Env) -> Option<Result<Self, ConfigError>> {
        let key = env.var("ANTHROPIC_API_KEY");
        let token = env.var("ANTHROPIC_AUTH_TOKEN");
        if key.is_none() && token.is_none() {
            return None;
        }
        let base = env
            .var("ANTHROPIC_BASE_URL")
            .unwrap_or_else(|| DEFAULT_BASE_URL.into());
        let cred = if key.is_some() {
            "api_key_env = \"ANTHROPIC_API_KEY\""
        } else {
            "auth_token_env = \"ANTHROPIC_AUTH_TOKEN\""
        };
        let text = format!(
            "[[endpoints]]\nname = \"default\"\nbase_url = {}\n{cred}\n",
            toml_string(&base)
        );
        Some(Self::from_toml(&text, "the ANTHROPIC_* environment", env))
    }
}

/// Quotes a string as a TOML basic string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The key named on a line of TOML (`key = value` or `[table]`), if it looks like one.
/// Notes a file `toml` could not read: at the error's line, under the key or table that line
/// names (else `fallback`). The key is named from the line, never from the offending text itself:
/// that text may be an unquoted secret.
fn parse_problem(p: &mut Problems, text: &str, e: &toml::de::Error, fallback: &str) {
    let line = e.span().map(|s| p.line_of(s.start));
    let key = line
        .and_then(|l| text.lines().nth(l - 1))
        .and_then(key_of_line)
        .unwrap_or_else(|| fallback.into());
    p.at_line(line, key, e.message().trim().to_string());
}

fn key_of_line(line: &str) -> Option<String> {
    let line = line.trim();
    let key = if let Some(rest) = line.strip_prefix('[') {
        rest.trim_start_matches('[').split(']').next()?
    } else {
        line.split_once('=')?.0
    };
    let key = key.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c);
    (!key.is_empty() && key.len() <= 64 && key.chars().all(plain)).then(|| key.to_string())
}

/// An ignored-key path from `serde_ignored` as segments: map keys, and `[i]` for array items.
/// Segments that only exist because of `Spanned` wrappers are dropped.
fn path_segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(format!("[{index}]")),
        Path::Map { key, .. } if !key.starts_with("$__") => out.push(key.clone()),
        _ => {}
    }
    out
}

/// `server.lisen`, `endpoints[1].nmae`.
fn dotted(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if !s.is_empty() && !seg.starts_with('[') {
            s.push('.');
        }
        s.push_str(seg);
    }
    s
}

/// The path of the value written at `offset`: the deepest key whose value covers it.
fn path_at(table: &toml::de::DeTable<'_>, offset: usize) -> Option<Vec<String>> {
    use toml::de::DeValue;
    let covers = |span: std::ops::Range<usize>| span.contains(&offset);
    for (key, value) in table.iter() {
        let here = || vec![key.get_ref().to_string()];
        match value.get_ref() {
            // Tables are searched whatever their span: a `[table]`'s span is its header only.
            DeValue::Table(t) => {
                if let Some(mut rest) = path_at(t, offset) {
                    rest.insert(0, key.get_ref().to_string());
                    return Some(rest);
                }
                if covers(value.span()) {
                    return Some(here());
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let inner = match item.get_ref() {
                        DeValue::Table(t) => path_at(t, offset),
                        _ => None,
                    };
                    if inner.is_some() || covers(item.span()) {
                        let mut path = here();
                        path.push(format!("[{i}]"));
                        path.extend(inner.unwrap_or_default());
                        return Some(path);
                    }
                }
                if covers(value.span()) {
                    return Some(here());
                }
            }
            _ if covers(value.span()) => return Some(here()),
            _ => {}
        }
    }
    None
}

/// Where the last key of `path` is written in the document.
fn key_offset(table: &toml::de::DeTable<'_>, path: &[String]) -> Option<usize> {
    let (first, rest) = path.split_first()?;
    let (key, value) = table.iter().find(|(k, _)| k.get_ref() == first)?;
    let Some(next) = rest.first() else {
        return Some(key.span().start);
    };
    let mut value = value.get_ref();
    let mut rest = rest;
    if let Some(index) = next
        .strip_prefix('[')
        .and_then(|i| i.trim_end_matches(']').parse::<usize>().ok())
    {
        let toml::de::DeValue::Array(items) = value else {
            return None;
        };
        value = items.get(index)?.get_ref();
        rest = &rest[1..];
        if rest.is_empty() {
            return Some(key.span().start);
        }
    }
    match value {
        toml::de::DeValue::Table(t) => key_offset(t, rest),
        _ => None,
    }
}

impl Prices {
    /// Only the `[prices]` table of a config file, validated (for `ccgate usage`, like
    /// [`StorageConfig::from_toml`]).
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct OnlyPrices {
            #[serde(default)]
            prices: std::collections::BTreeMap<String, toml::Spanned<RawPrice>>,
        }
        let mut p = Problems::new(text);
        let (parsed, type_problems) = lenient::collect(|| toml::from_str::<OnlyPrices>(text));
        for t in type_problems {
            let line = p.line_of(t.span.start);
            p.at_line(Some(line), "prices", t.message);
        }
        let prices = match parsed {
            Ok(raw) => validate_prices(&raw.prices, &mut p),
            Err(e) => {
                parse_problem(&mut p, text, &e, "prices");
                Prices::default()
            }
        };
        p.finish(source_name, prices)
    }
}

impl StorageConfig {
    /// Only the `[storage]` table of a config file, validated; the rest of the file is not
    /// checked (`ccgate usage` needs no endpoint credentials from the environment).
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        #[derive(Deserialize)]
        struct OnlyStorage {
            #[serde(default)]
            storage: RawStorage,
        }
        let mut p = Problems::new(text);
        let storage = match toml::from_str::<OnlyStorage>(text) {
            Ok(raw) => validate_storage(&raw.storage, &mut p),
            Err(e) => {
                parse_problem(&mut p, text, &e, "storage");
                StorageConfig::default()
            }
        };
        p.finish(source_name, storage)
    }
}
