//! The `ccgate` binary: parse, run, map the result to an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ccgate::cli::Cli::parse();
    ccgate::logging::init();
    match ccgate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            ccgate::cli::report(&e);
            std::process::ExitCode::from(2)
        }
    }
}
