//! The commands' standard output. A reader that goes away (`ccgate requests --follow | head`)
//! ends the command quietly with exit code 0, as a closed pipe ends a classic Unix tool, instead
//! of the panic `println!` raises; any other write error is reported and exits 1.

use std::io::{self, Write};

/// Writes `args` to standard output (see the module docs for errors). Used through the
/// `out!` and `outln!` macros.
pub fn print(args: std::fmt::Arguments<'_>) {
    let result = io::stdout().lock().write_fmt(args);
    settle(result);
}

/// Writes `bytes` to standard output, as [`print`] does.
pub fn print_bytes(bytes: &[u8]) {
    let mut stdout = io::stdout().lock();
    let result = stdout.write_all(bytes).and_then(|()| stdout.flush());
    settle(result);
}

fn settle(result: io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }
}
