//! A CSV for `outpost replay` (detect::replay): NAB `timestamp,value` or
//! `outpost export`'s `ts_ms,<features…>`, written to a file and replayed
//! through the baseline detector. Malformed input must give an error that
//! names the line, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outpost::detect::baseline::BaselineConfig;
use outpost::detect::replay::{replay, ReplayDetector};

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("outpost-fuzz-replay-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let input = d.join("in.csv");
    std::fs::write(&input, data).expect("write in.csv");
    // A short learning phase, so a small input reaches the scoring code.
    let cfg = BaselineConfig {
        learning_steps: 2,
        ..BaselineConfig::default()
    };
    let _ = replay(&input, &d.join("out.csv"), ReplayDetector::Baseline(cfg));
});
