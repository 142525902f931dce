//! A model package tar, as `model.install` carries it (base64 in the
//! command) and as `outpost model` reads a `.tar`: the bytes go through
//! `sync::command::unpack_package` (what the fleet command unpacks) and,
//! written to a file, through `detect::onnx::load_package` (which reads a
//! tar in memory).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use outpost::detect::onnx;
use outpost::sync::command;

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("outpost-fuzz-tar-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let unpacked = d.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir(&unpacked).expect("create the unpack dir");
    let _ = command::unpack_package(data, &unpacked);
    let tar = d.join("package.tar");
    std::fs::write(&tar, data).expect("write package.tar");
    let _ = onnx::load_package(&tar);
});
