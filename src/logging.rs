//! Log setup: `tracing` to stderr, `RUST_LOG` to filter (default `info`), `CCGATE_LOG_FORMAT=json`
//! for JSON lines. Secrets never reach a log line: credentials live in [`crate::config::Secret`]
//! (redacted `Debug`) and in header values marked sensitive.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = builder.try_init();
}
