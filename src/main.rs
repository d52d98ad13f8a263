//! The `ccgate` binary: parse, set up logging, run, map the result to an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ccgate::cli::Cli::parse();
    // After parsing, so `serve --log-format` can choose; the guard flushes the log writer on exit.
    let _log = ccgate::logging::init(cli.log_format());
    match ccgate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = ccgate::cli::exit_code(&e);
            if code == 2 {
                ccgate::cli::report(&e);
            }
            std::process::ExitCode::from(code)
        }
    }
}
