//! Per-step inference of ONNX detector packages under tract, through
//! `LoadedModel::score` (what the daemon calls every step): a 32-feature
//! autoencoder (goal: p50 at most 20 µs) and model-tools' 100-tree
//! IsolationForest (goal: p50 at most 200 µs).
//!
//!   cargo bench -p outpost --bench inference -- --warm-up-time 1 --measurement-time 5
//!
//! The packages are the test fixtures (`tests/fixtures/packages/`, trained
//! by model-tools; `generate.py` there regenerates them). Each bench scores
//! the package's own self-test vectors in turn, healthy rows and the
//! outlier, so the trees' paths vary as they do in service.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use outpost::detect::onnx::load_package;

fn bench_package(c: &mut Criterion, name: &str, id: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/packages")
        .join(name);
    let mut model = match load_package(&dir) {
        Ok(m) => m,
        Err(e) => panic!("{e}"),
    };
    let inputs: Vec<Vec<f32>> = model
        .manifest()
        .selftests
        .iter()
        .map(|t| t.input.clone())
        .collect();
    let mut i = 0usize;
    c.bench_function(id, |b| {
        b.iter(|| {
            i = (i + 1) % inputs.len();
            let out = model.score(std::hint::black_box(&inputs[i]));
            std::hint::black_box(out.map(|o| o.score).unwrap_or(f32::NAN))
        })
    });
}

fn inference(c: &mut Criterion) {
    bench_package(c, "autoencoder-32", "inference/autoencoder_32_features");
    bench_package(c, "iforest", "inference/iforest_100_trees");
}

criterion_group!(benches, inference);
criterion_main!(benches);
