//! The `ccgate` binary: parse, set up logging, run, map the result to an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ccgate::cli::Cli::parse();
    // After parsing, so `serve --log-format` can choose; the guard flushes the log writer on exit.
    let _log = ccgate::cli::logging::init(cli.log_format());
    match ccgate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // An `Exit` has been reported already and only carries the exit code.
            if e.downcast_ref::<ccgate::cli::Exit>().is_none() {
                ccgate::cli::report(&e);
            }
            std::process::ExitCode::from(ccgate::cli::exit_code(&e))
        }
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
