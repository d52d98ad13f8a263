//! Log setup: `tracing` to stderr, `RUST_LOG` to filter (default `info`), text or JSON lines
//! (`serve --log-format`, or `CCGATE_LOG_FORMAT`). Secrets never reach a log line: credentials live
//! in [`crate::config::Secret`] (redacted `Debug`) and in header values marked sensitive.
//!
//! Lines are handed to a background writer thread (`tracing-appender`'s non-blocking writer), so a
//! slow or stalled stderr never blocks a request: when its buffer is full, lines are dropped rather
//! than waited for. Keep the returned [`LogGuard`] alive for the whole process; dropping it
//! flushes what is buffered.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, event fields at the top level (`request_id`, `endpoint`, ...).
    Json,
}

impl LogFormat {
    /// `CCGATE_LOG_FORMAT`, for commands without a `--log-format` flag: read as `serve` reads it
    /// (the same names, in any case), except that a value that names no format means text rather
    /// than an error.
    pub fn from_env() -> Self {
        std::env::var("CCGATE_LOG_FORMAT")
            .ok()
            .and_then(|v| Self::parse(&v))
            .unwrap_or_default()
    }

    /// A format by name, in any case, surrounding blanks ignored.
    fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name.trim(), true).ok()
    }
}

/// Keeps the background log writer running; dropping it flushes buffered lines.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber (once; later calls install nothing and return an inert guard).
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A few thousand lines of slack: the default (128k lines) preallocates megabytes.
    let (writer, worker) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4096)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).try_init().is_ok()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
            .is_ok(),
    };
    LogGuard {
        _worker: installed.then_some(worker),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_in_any_case() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse(" JSON\n"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("Text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("xml"), None);
    }
}
