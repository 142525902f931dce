//! Link options for the `outpost` binary.
//!
//! On GNU/Linux the binary is linked with packed relative relocations
//! (`DT_RELR`, glibc ≥ 2.36, binutils ≥ 2.38): a position-independent
//! executable keeps one 24-byte relocation per pointer in its read-only
//! data, about 75,000 of them here, which the loader reads at every start.
//! Packed, the table shrinks from 1.2–1.8 MB to a few kilobytes: a smaller
//! binary and fewer resident pages, with ASLR kept. Set `OUTPOST_RELR=0`
//! to build for an older glibc.
//!
//! `OUTPOST_SYMBOL_ORDER=FILE` (experimental, needs lld as the linker)
//! lays the functions FILE lists out first, in its order: with the
//! functions the daemon runs every second next to each other, the kernel's
//! fault-around maps far fewer code pages (BENCHMARKS.md, "The agent's RSS
//! and CPU with the uplink on"). `benches/symbol_order.py` writes FILE
//! from a callgrind profile.

fn main() {
    println!("cargo:rerun-if-env-changed=OUTPOST_RELR");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let wanted = std::env::var("OUTPOST_RELR").map_or(true, |v| v != "0");
    if os == "linux" && env == "gnu" && wanted {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-env-changed=OUTPOST_SYMBOL_ORDER");
    if let Ok(order) = std::env::var("OUTPOST_SYMBOL_ORDER") {
        println!("cargo:rerun-if-changed={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
