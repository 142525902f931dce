//! A model package: `model.toml`, a NUL byte, then `model.onnx`. The
//! manifest goes through `detect::onnx::manifest::parse` as it is; then its
//! `sha256 = "..."` is set to the digest of the ONNX bytes (so the fuzzer
//! gets past the digest check into tract), both files are written to a
//! directory and `detect::onnx::load_package` loads, checks, optimizes and
//! self-tests it. A package that loads is scored once.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outpost::detect::onnx;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("outpost-fuzz-model-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

/// Replaces the value of the first `sha256 = "..."` with `digest`.
fn with_digest(manifest: &[u8], digest: &str) -> Vec<u8> {
    let Some(at) = find(manifest, b"sha256") else {
        return manifest.to_vec();
    };
    let Some(open) = find(&manifest[at..], b"\"").map(|i| at + i + 1) else {
        return manifest.to_vec();
    };
    let Some(close) = find(&manifest[open..], b"\"").map(|i| open + i) else {
        return manifest.to_vec();
    };
    let mut out = manifest[..open].to_vec();
    out.extend_from_slice(digest.as_bytes());
    out.extend_from_slice(&manifest[close..]);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let (manifest, onnx_bytes) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(text) = std::str::from_utf8(manifest) {
        let _ = onnx::manifest::parse(text);
    }
    let manifest = with_digest(manifest, &onnx::sha256_hex(onnx_bytes));
    let d = dir();
    std::fs::write(d.join("model.toml"), &manifest).expect("write model.toml");
    std::fs::write(d.join("model.onnx"), onnx_bytes).expect("write model.onnx");
    let Ok(mut model) = onnx::load_package(d) else {
        return;
    };
    let x: Vec<f32> = model.manifest().features.iter().map(|f| f.median).collect();
    let _ = model.score(&x);
    if model.has_contributions() {
        let _ = model.attribution(&x);
    }
});
