//! `ccgate usage`: the ledger of tokens per day, endpoint and model, read straight from the
//! database file (read-only; no gateway needed).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;

use crate::clock::{day_of, day_string};
use crate::config::{Prices, ProcessEnv, StorageConfig, resolve_config_path};
use crate::proxy::usage::UsageSums;
use crate::proxy::usage::hit_rate;
use crate::wire::usage::Usage;

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

/// Runs `ccgate usage`: reads the database file directly (read-only; no gateway needed).
pub fn run(args: UsageArgs) -> anyhow::Result<()> {
    let (storage, prices) = settings(args.config)?;
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
    // The cost of the rows whose model has a price; `priced_all` says whether that is all of them.
    let mut total_cost = 0.0;
    let mut priced_all = true;
    let mut costs = Vec::with_capacity(rows.len());
    for r in &rows {
        let usage = Usage {
            input: r.input_tokens,
            output: r.output_tokens,
            cache_creation: r.cache_creation_input_tokens,
            cache_read: r.cache_read_input_tokens,
            cache_creation_1h: r.cache_creation_1h_input_tokens,
            web_searches: r.web_search_requests,
        };
        total.add(&UsageSums {
            requests: r.requests,
            usage,
        });
        let cost = prices.for_model(&r.model).map(|p| p.cost(&usage));
        match cost {
            Some(c) => total_cost += c,
            None => priced_all = false,
        }
        costs.push((hit_rate(&usage), cost));
    }
    if args.json {
        let v = serde_json::json!({
            "database": path.display().to_string(),
            "since": since,
            "days": args.days,
            "rows": rows.iter().zip(&costs).map(|(r, (hit, cost))| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["cache_hit_rate"] = serde_json::json!(hit);
                v["cost_usd"] = serde_json::json!(cost);
                v
            }).collect::<Vec<_>>(),
            "total": {
                "cache_hit_rate": hit_rate(&total.usage),
                "cost_usd": total_cost,
                "cost_complete": priced_all,
                "requests": total.requests,
                "input_tokens": total.usage.input,
                "output_tokens": total.usage.output,
                "cache_creation_input_tokens": total.usage.cache_creation,
                "cache_read_input_tokens": total.usage.cache_read,
                "cache_creation_1h_input_tokens": total.usage.cache_creation_1h,
                "web_search_requests": total.usage.web_searches,
            },
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !path.exists() {
        outln!(
            "no usage recorded yet: {} does not exist (the gateway creates it)",
            path.display()
        );
        return Ok(());
    }
    outln!("usage since {since} (UTC), from {}", path.display());
    if rows.is_empty() {
        outln!("\nno requests in these {} days", args.days);
        return Ok(());
    }
    let num = |n: u64| n.to_string();
    let rate = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.1}%", r * 100.0));
    let usd = |c: Option<f64>| c.map_or("-".into(), |c| format!("${c:.4}"));
    let mut table: Vec<Vec<String>> = rows
        .iter()
        .zip(&costs)
        .map(|(r, (hit, cost))| {
            vec![
                r.day.clone(),
                r.endpoint.clone(),
                r.model.clone(),
                num(r.requests),
                num(r.input_tokens),
                num(r.output_tokens),
                num(r.cache_creation_input_tokens),
                num(r.cache_read_input_tokens),
                rate(*hit),
                usd(*cost),
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
        rate(hit_rate(&total.usage)),
        if priced_all {
            usd(Some(total_cost))
        } else {
            format!("{}+", usd(Some(total_cost)))
        },
    ]);
    outln!();
    out!(
        "{}",
        crate::cli::table::table(
            &[
                "DAY",
                "ENDPOINT",
                "MODEL",
                "REQUESTS",
                "INPUT",
                "OUTPUT",
                "CACHE WRITE",
                "CACHE READ",
                "CACHE HIT",
                "COST",
            ],
            &table,
        )
    );
    if !priced_all {
        outln!(
            "\n`+`: some models have no price (add them under [prices]); their cost is not counted"
        );
    }
    outln!(
        "costs use built-in list prices (which may drift) unless [prices] in the config sets them"
    );
    Ok(())
}

/// The `[storage]` and `[prices]` settings: from `--config`, else `$CCGATE_CONFIG`, else the default config file
/// if it exists, else the defaults (see [`resolve_config_path`]). Only `[storage]` is read, so a
/// config whose credentials come from variables this shell does not have still works.
fn settings(explicit: Option<PathBuf>) -> anyhow::Result<(StorageConfig, Prices)> {
    let Some((path, chosen)) = resolve_config_path(explicit.as_deref(), &ProcessEnv) else {
        return Ok(Default::default());
    };
    if !path.exists() && !chosen {
        return Ok(Default::default());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let source = path.display().to_string();
    Ok((
        StorageConfig::from_toml(&text, &source)?,
        Prices::from_toml(&text, &source)?,
    ))
}
