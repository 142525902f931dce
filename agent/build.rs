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
//! Optimised Linux builds lay out first, next to each other, the functions
//! the daemon runs every second (`hot-code.txt`, from a profile): on every
//! code fault the kernel maps the 64 KiB around the page, and with the hot
//! code spread thinly over 12 MB most of what it mapped never ran
//! (BENCHMARKS.md, "Hot code first"). The list holds section-name
//! patterns without the hashes Rust puts in symbol names, so one list
//! serves every target and feature set; a linker script gathers the
//! matching `.text.*` sections into `.text.hot` before `.text`. Set
//! `OUTPOST_HOT_CODE=0` to link in the default order.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();

    println!("cargo:rerun-if-env-changed=OUTPOST_RELR");
    let wanted = std::env::var("OUTPOST_RELR").map_or(true, |v| v != "0");
    if os == "linux" && env == "gnu" && wanted {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }

    println!("cargo:rerun-if-env-changed=OUTPOST_HOT_CODE");
    println!("cargo:rerun-if-changed=hot-code.txt");
    let optimised = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let wanted = std::env::var("OUTPOST_HOT_CODE").map_or(true, |v| v != "0");
    if os == "linux" && optimised && wanted {
        let list = std::fs::read_to_string("hot-code.txt").expect("agent/hot-code.txt");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("hot-code.ld");
        std::fs::write(&out, linker_script(&list)).expect("write the hot-code linker script");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", out.display());
    }
}

/// A linker script that adds an output section `.text.hot` before `.text`
/// (`INSERT`: the linker's default layout stays as it is otherwise) and
/// fills it with the sections of the listed functions, in the list's order.
/// Each function has its own input-section line: within one line a linker
/// keeps the input files' order, not the patterns'.
fn linker_script(list: &str) -> String {
    let mut script = String::from("SECTIONS\n{\n  .text.hot :\n  {\n");
    for pattern in list.lines().map(str::trim) {
        if pattern.is_empty() || pattern.starts_with('#') {
            continue;
        }
        assert!(
            pattern
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_$.*".contains(c)),
            "hot-code.txt: {pattern:?} is not a section-name pattern"
        );
        // LLVM and GCC put functions they judge cold (`#[cold]`, say) in
        // `.text.unlikely.NAME`; a pattern without a `*` at its end also
        // takes the compilers' clones (`NAME.constprop.0`, ...).
        let mut line = String::from("    *(");
        for prefix in [".text.", ".text.unlikely."] {
            write!(line, "{prefix}{pattern} ").expect("write to a String");
            if !pattern.ends_with('*') {
                write!(line, "{prefix}{pattern}.* ").expect("write to a String");
            }
        }
        script.push_str(line.trim_end());
        script.push_str(")\n");
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    script
}
