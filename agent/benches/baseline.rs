//! The baseline detector's cost: one update per signal (goal: at most 1 µs)
//! and offline replay of a NAB file (goal: at least 200,000 rows/s).
//!
//!   cargo bench -p outpost --bench baseline
//!
//! The replay reads `$NAB_DATA/realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv`
//! (`NAB_DATA` defaults to `../shared/data/nab` beside the repository); when
//! that file is missing it says so and replays a generated file of the same
//! shape (4032 rows) instead.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use outpost::detect::baseline::{Baseline, BaselineConfig, Score};
use outpost::detect::replay::{replay, ReplayDetector};

/// Deterministic noise in [-1, 1] (xorshift).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    }
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline_update");
    for signals in [6usize, 60, 600] {
        let names: Arc<[String]> = (0..signals)
            .map(|i| format!("host.signal_{i:03}.mean_60s"))
            .collect::<Vec<_>>()
            .into();
        // A ring of 1024 observation vectors: noise around per-signal
        // levels, with an occasional excursion so the scoring path runs too.
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let ring: Vec<Vec<f32>> = (0..1024)
            .map(|step| {
                (0..signals)
                    .map(|i| {
                        let level = (i % 17) as f32 * 10.0;
                        let spike = if (step * 31 + i) % 997 == 0 {
                            50.0
                        } else {
                            0.0
                        };
                        level + noise.next() + spike
                    })
                    .collect()
            })
            .collect();
        let mut b = Baseline::new(BaselineConfig::default());
        let mut out = Score::default();
        for v in ring.iter().cycle().take(5000) {
            b.update_into(&names, v, &mut out);
        }
        g.throughput(Throughput::Elements(signals as u64));
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("per_step", signals), |bench| {
            bench.iter(|| {
                k = (k + 1) & 1023;
                b.update_into(&names, &ring[k], &mut out);
                out.score
            })
        });
    }
    g.finish();
}

fn nab_file() -> (PathBuf, Option<tempfile::TempDir>) {
    let data = std::env::var_os("NAB_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/nab"));
    let file = data.join("realAWSCloudwatch/ec2_cpu_utilization_24ae8d.csv");
    if file.is_file() {
        return (file, None);
    }
    eprintln!(
        "{} not found: replaying a generated file of the same shape",
        file.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("generated.csv");
    let mut noise = Noise(17);
    let mut text = String::from("timestamp,value\n");
    for i in 0..4032usize {
        let (d, h, m) = (1 + i / 288, (i / 12) % 24, (i % 12) * 5);
        let v = 0.13 + 0.01 * noise.next() + if i % 288 == 100 { 1.5 } else { 0.0 };
        text.push_str(&format!("2014-01-{d:02} {h:02}:{m:02}:00,{v}\n"));
    }
    std::fs::write(&path, text).expect("write generated file");
    (path, Some(dir))
}

fn replay_nab(c: &mut Criterion) {
    let (input, _keep) = nab_file();
    let rows = std::fs::read_to_string(&input)
        .expect("read input")
        .lines()
        .count() as u64
        - 1;
    let out_dir = tempfile::tempdir().expect("tempdir");
    let output = out_dir.path().join("scores.csv");
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(rows));
    g.sample_size(30);
    g.bench_function("nab_file", |b| {
        b.iter(|| {
            replay(
                &input,
                &output,
                ReplayDetector::Baseline(BaselineConfig::default()),
            )
            .expect("replay")
        })
    });
    g.finish();
}

criterion_group!(benches, update, replay_nab);
criterion_main!(benches);
