//! `outpost`: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outpost::cli::Cli::parse();
    ExitCode::from(outpost::cli::execute(cli))
}
