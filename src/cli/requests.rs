//! `ccgate requests`: the running gateway's recent requests (`GET /_ccgate/requests`), once or,
//! with `--follow`, polled until Ctrl-C, printing each new request as it comes.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::cli::table::*;
use crate::cli::target::*;
use crate::config::ProcessEnv;

/// `ccgate requests`: the recent requests of the running gateway.
#[derive(clap::Args, Debug)]
pub struct RequestsArgs {
    /// Config file, for the gateway's address and access token.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The gateway's URL (default: http://<server.listen> from the config).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// How many of the most recent requests to show first.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 20)]
    pub limit: u32,
    /// Keep polling and print new requests as they come, until Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    /// How often `--follow` polls.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Print one JSON object per request instead of a table.
    #[arg(long)]
    pub json: bool,
}

const HEADERS: [&str; 11] = [
    "TIME",
    "REQUEST ID",
    "REQUEST",
    "MODEL",
    "ENDPOINT",
    "ATTEMPTS",
    "STATUS",
    "OUTCOME",
    "FIRST BYTE",
    "TOTAL",
    "TOKENS IN/OUT/CW/CR",
];

/// Runs `ccgate requests`.
pub fn run(args: RequestsArgs) -> anyhow::Result<()> {
    let target = find_target(args.config.as_deref(), args.url.as_deref(), &ProcessEnv)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let client = AdminClient::new(target)?;
        let first = fetch(&client, args.limit, 0).await?;
        let mut last = first.iter().map(seq).max().unwrap_or(0);
        let rows: Vec<&Value> = first.iter().rev().collect();
        if args.json {
            for r in &rows {
                println!("{r}");
            }
        } else {
            let cells: Vec<Vec<String>> = rows.iter().map(|r| cells(r)).collect();
            print!("{}", table(&HEADERS, &cells));
        }
        if !args.follow {
            return Ok(());
        }
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                () = tokio::time::sleep(args.interval) => {}
            }
            let mut new = fetch(&client, u32::MAX, last).await?;
            // A restarted gateway counts from 1 again.
            if new.is_empty() {
                let newest = fetch(&client, 1, 0).await?;
                if newest.first().is_some_and(|r| seq(r) < last) {
                    last = 0;
                    new = fetch(&client, args.limit, 0).await?;
                }
            }
            for r in new.iter().rev() {
                last = last.max(seq(r));
                if args.json {
                    println!("{r}");
                } else {
                    println!("{}", cells(r).join("  "));
                }
            }
        }
    })
}

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap_or(0)
}

async fn fetch(client: &AdminClient, limit: u32, after: u64) -> anyhow::Result<Vec<Value>> {
    let view = client
        .get_json(&format!("requests?limit={limit}&after={after}"), "a ccgate")
        .await?;
    Ok(view["requests"].as_array().cloned().unwrap_or_default())
}

/// One request as table cells.
fn cells(r: &Value) -> Vec<String> {
    let opt = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let ms = |v: &Value| v.as_f64().map_or("-".into(), fmt_ms);
    let mut tokens = String::new();
    if r["input_tokens"].is_null() {
        tokens.push('-');
    } else {
        let _ = write!(
            tokens,
            "{}/{}/{}/{}",
            u(&r["input_tokens"]),
            u(&r["output_tokens"]),
            u(&r["cache_creation_input_tokens"]),
            u(&r["cache_read_input_tokens"])
        );
    }
    vec![
        opt(&r["at"]),
        opt(&r["request_id"]),
        format!("{} {}", s(&r["method"]), s(&r["path"])),
        opt(&r["model"]),
        opt(&r["endpoint"]),
        u(&r["attempts"]).to_string(),
        opt(&r["status"]),
        opt(&r["outcome"]),
        ms(&r["first_byte_ms"]),
        ms(&r["total_ms"]),
        tokens,
    ]
}
