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
        let (mut ring, first) = fetch(&client, args.limit, 0).await?;
        let mut last = first.iter().map(seq).max().unwrap_or(0);
        let rows: Vec<&Value> = first.iter().rev().collect();
        if args.json {
            for r in &rows {
                outln!("{r}");
            }
        } else {
            let cells: Vec<Vec<String>> = rows.iter().map(|r| cells(r)).collect();
            out!("{}", table(&HEADERS, &cells));
        }
        if !args.follow {
            return Ok(());
        }
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut away = false;
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(()),
                () = tokio::time::sleep(args.interval) => {}
            }
            // A gateway that is away for a moment (a restart) is waited for, said once.
            let new = match since(&client, &mut ring, &mut last).await {
                Ok(new) => {
                    if away {
                        eprintln!("the gateway answers again");
                        away = false;
                    }
                    new
                }
                Err(e) => {
                    if !away {
                        eprintln!("{e:#}; still trying (Ctrl-C to stop)");
                        away = true;
                    }
                    continue;
                }
            };
            for r in new.iter().rev() {
                last = last.max(seq(r));
                if args.json {
                    outln!("{r}");
                } else {
                    let row: Vec<String> = cells(r).iter().map(|c| plain(c)).collect();
                    outln!("{}", row.join("  "));
                }
            }
        }
    })
}

/// The requests the gateway has seen since `last`, newest first. A restarted gateway counts from
/// 1 again, and then everything it has kept is new: its ring says when it began (`ring` keeps
/// what it said last); a gateway that does not say is taken for restarted when it has nothing
/// after `last` and its newest is older.
async fn since(
    client: &AdminClient,
    ring: &mut Option<String>,
    last: &mut u64,
) -> anyhow::Result<Vec<Value>> {
    let (now_ring, new) = fetch(client, u32::MAX, *last).await?;
    let restarted = match (&*ring, &now_ring) {
        (Some(was), Some(is)) => was != is,
        _ => {
            new.is_empty()
                && fetch(client, 1, 0)
                    .await?
                    .1
                    .first()
                    .is_some_and(|r| seq(r) < *last)
        }
    };
    let new = if restarted {
        let all = fetch(client, u32::MAX, 0).await?.1;
        *last = 0;
        all
    } else {
        new
    };
    *ring = now_ring;
    Ok(new)
}

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap_or(0)
}

/// The gateway's requests after `after` (at most `limit`, newest first), and when its sequence
/// began (`None` from a gateway that does not say).
async fn fetch(
    client: &AdminClient,
    limit: u32,
    after: u64,
) -> anyhow::Result<(Option<String>, Vec<Value>)> {
    let view = client
        .get_json(&format!("requests?limit={limit}&after={after}"), "a ccgate")
        .await?;
    let ring = view["started_at"].as_str().map(str::to_owned);
    Ok((
        ring,
        view["requests"].as_array().cloned().unwrap_or_default(),
    ))
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
