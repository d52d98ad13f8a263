//! `ccgate check`: probes every configured endpoint now, in parallel, from this process (no gateway
//! needed). Probe details are scrubbed with [`Endpoint::scrub`].

use std::fmt::Write as _;

use crate::cli::table::*;
use crate::cli::target::runtime;
use crate::config::Config;
use crate::health::endpoint::Endpoint;

/// Probes every configured endpoint now, in parallel, from this process. Returns the report and
/// whether at least one enabled endpoint works.
pub fn check(config: Config) -> anyhow::Result<(String, bool)> {
    let rt = runtime()?;
    rt.block_on(async move {
        let gw = crate::proxy::gateway::Gateway::new(config)?;
        let endpoints: Vec<std::sync::Arc<Endpoint>> = gw.registry.endpoints.to_vec();
        let results = futures_util::future::join_all(
            endpoints
                .iter()
                .map(|ep| crate::proxy::probe::probe(&gw, ep)),
        )
        .await;
        let mut rows = Vec::new();
        let mut working = 0;
        let mut total = 0;
        for (ep, r) in endpoints.iter().zip(&results) {
            let enabled = ep.config.enabled;
            let result = match (r.passed, enabled) {
                (true, true) => "ok",
                (true, false) => "ok (disabled)",
                (false, true) => "FAILED",
                (false, false) => "FAILED (disabled)",
            };
            total += usize::from(enabled);
            working += usize::from(r.passed && enabled);
            rows.push(vec![
                ep.name.clone(),
                ep.probe.as_str().to_string(),
                result.to_string(),
                fmt_ms(r.latency.as_secs_f64() * 1000.0),
                // `probe` has scrubbed it already.
                r.detail.clone(),
            ]);
        }
        let mut out = table(&["ENDPOINT", "MODE", "RESULT", "LATENCY", "DETAIL"], &rows);
        let _ = writeln!(
            out,
            "\n{working} of {total} enabled endpoint{} work{}",
            if total == 1 { "" } else { "s" },
            if working == 1 && total != 1 { "s" } else { "" },
        );
        Ok((out, working > 0))
    })
}
