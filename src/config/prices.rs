//! `[prices]`: what a million tokens of each kind cost, per model, for `ccgate usage`'s cost
//! columns. Built-in list prices for the Claude families apply unless a `[prices]` entry matches.

use serde::Deserialize;
use toml::Spanned;

use crate::config::glob_match;
use crate::config::lenient::lenient;
use crate::wire::usage::Usage;

/// Prices of one model in USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    /// Uncached input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Prompt-cache writes (`cache_creation_input_tokens`, the 5-minute cache).
    pub cache_write: f64,
    /// Prompt-cache writes to the 1-hour cache.
    pub cache_write_1h: f64,
    /// Prompt-cache reads.
    pub cache_read: f64,
    /// One web search the server ran, in USD (not per million).
    pub web_search: f64,
}

/// Anthropic's price of one server-side web search: $10 per 1,000.
pub const WEB_SEARCH_USD: f64 = 0.01;

impl Price {
    const fn list(input: f64, output: f64) -> Self {
        // Anthropic's cache pricing is a fixed ratio of the input price: writes 1.25× (5-minute
        // cache) or 2× (1-hour cache), reads 0.1×.
        Self {
            input,
            output,
            cache_write: input * 1.25,
            cache_write_1h: input * 2.0,
            cache_read: input * 0.1,
            web_search: WEB_SEARCH_USD,
        }
    }

    /// What `usage` cost, in USD: the 1-hour cache's share of the writes at its own price.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let writes_1h = usage.cache_creation_1h.min(usage.cache_creation);
        (usage.input as f64 * self.input
            + usage.output as f64 * self.output
            + (usage.cache_creation - writes_1h) as f64 * self.cache_write
            + writes_1h as f64 * self.cache_write_1h
            + usage.cache_read as f64 * self.cache_read)
            / 1_000_000.0
            + usage.web_searches as f64 * self.web_search
    }
}

/// The built-in prices (USD per million tokens), list prices at the time of writing; they may
/// drift from Anthropic's price list, which a `[prices]` entry overrides. The first pattern that
/// matches wins, so the specific ones come first.
pub const DEFAULT_PRICES: &[(&str, Price)] = &[
    ("claude-opus-4-5*", Price::list(5.0, 25.0)),
    ("claude-opus-*", Price::list(15.0, 75.0)),
    ("claude-3-opus*", Price::list(15.0, 75.0)),
    ("claude-sonnet-*", Price::list(3.0, 15.0)),
    ("claude-3-7-sonnet*", Price::list(3.0, 15.0)),
    ("claude-3-5-sonnet*", Price::list(3.0, 15.0)),
    ("claude-haiku-4-5*", Price::list(1.0, 5.0)),
    ("claude-3-5-haiku*", Price::list(0.8, 4.0)),
    ("claude-3-haiku*", Price::list(0.25, 1.25)),
];

/// `[prices]` as validated: the configured entries, then the built-in defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prices {
    /// (model name or glob, price) as configured.
    configured: Vec<(String, Price)>,
}

impl Prices {
    /// Prices with these configured entries in front of the defaults.
    pub fn new(configured: Vec<(String, Price)>) -> Self {
        Self { configured }
    }

    /// The price of `model`: a configured entry naming it exactly, else the configured glob with
    /// the longest pattern that matches, else the first default that matches; `None` when
    /// nothing does (its cost is then unknown, not zero).
    pub fn for_model(&self, model: &str) -> Option<Price> {
        if let Some((_, p)) = self.configured.iter().find(|(m, _)| m == model) {
            return Some(*p);
        }
        let glob = self
            .configured
            .iter()
            .filter(|(m, _)| glob_match(m.as_bytes(), model.as_bytes()))
            .max_by_key(|(m, _)| m.len());
        if let Some((_, p)) = glob {
            return Some(*p);
        }
        DEFAULT_PRICES
            .iter()
            .find(|(m, _)| glob_match(m.as_bytes(), model.as_bytes()))
            .map(|(_, p)| *p)
    }
}

/// One `[prices."<model>"]` entry as written.
#[derive(Deserialize, Default)]
pub(super) struct RawPrice {
    #[serde(default, deserialize_with = "lenient")]
    pub(super) input: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) output: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) cache_write: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) cache_read: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) cache_write_1h: Option<Spanned<f64>>,
    #[serde(default, deserialize_with = "lenient")]
    pub(super) web_search: Option<Spanned<f64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_prices_win_then_defaults() {
        let u = Usage {
            input: 1_000_000,
            output: 1_000_000,
            cache_creation: 1_000_000,
            cache_read: 1_000_000,
            ..Usage::default()
        };
        let none = Prices::default();
        let sonnet = none
            .for_model("claude-sonnet-4-5-20250929")
            .expect("sonnet");
        assert_eq!(sonnet.cost(&u), 3.0 + 15.0 + 3.75 + 0.3);
        // Writes to the 1-hour cache cost 2× input, web searches $10 per 1,000 (audit: every
        // write was priced as the 5-minute cache's, and searches not at all).
        let hour = Usage {
            cache_creation: 1_000_000,
            cache_creation_1h: 1_000_000,
            web_searches: 1_000,
            ..Usage::default()
        };
        assert_eq!(sonnet.cost(&hour), 6.0 + 10.0);
        let mixed = Usage {
            cache_creation: 1_000_000,
            cache_creation_1h: 400_000,
            ..Usage::default()
        };
        assert!((sonnet.cost(&mixed) - (0.6 * 3.75 + 0.4 * 6.0)).abs() < 1e-9);
        assert_eq!(none.for_model("claude-opus-4-5").expect("o").input, 5.0);
        assert_eq!(none.for_model("claude-opus-4-1").expect("o").input, 15.0);
        assert_eq!(none.for_model("gpt-4"), None);
        let p = |i| Price::list(i, 1.0);
        let mine = Prices::new(vec![
            ("claude-*".into(), p(1.0)),
            ("claude-sonnet-*".into(), p(2.0)),
            ("claude-sonnet-4".into(), p(3.0)),
        ]);
        assert_eq!(mine.for_model("claude-sonnet-4").expect("x").input, 3.0);
        assert_eq!(mine.for_model("claude-sonnet-4-5").expect("x").input, 2.0);
        assert_eq!(mine.for_model("claude-haiku-4-5").expect("x").input, 1.0);
        assert_eq!(mine.for_model("glm-4").map(|p| p.input), None);
    }
}
