//! Replays a recorded CSV through the baseline detector, until the
//! `outpost replay` subcommand is wired:
//!
//!   cargo run --release --example replay -- INPUT OUTPUT [--detector baseline]
//!
//! Prints `rows=N alerts=N seconds=S rows_per_sec=R` on success; exits 2 on
//! bad input or arguments, 1 on an I/O failure.

use std::path::PathBuf;
use std::process::ExitCode;

use outpost::detect::baseline::BaselineConfig;
use outpost::detect::replay::{replay, ReplayDetector, ReplayError};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut paths = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--detector" => match args.next().as_deref() {
                Some("baseline") => {}
                other => {
                    eprintln!("--detector: expected `baseline`, found {other:?}");
                    return ExitCode::from(2);
                }
            },
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let [input, output] = paths.as_slice() else {
        eprintln!("usage: replay INPUT OUTPUT [--detector baseline]");
        return ExitCode::from(2);
    };
    match replay(
        input,
        output,
        ReplayDetector::Baseline(BaselineConfig::default()),
    ) {
        Ok(s) => {
            println!(
                "rows={} alerts={} seconds={:.6} rows_per_sec={:.0}",
                s.rows,
                s.alerts,
                s.elapsed.as_secs_f64(),
                s.rows_per_sec()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                ReplayError::Parse { .. } => 2,
                _ => 1,
            })
        }
    }
}
