#!/usr/bin/env bash
# Builds outpost for an ARM target with Debian's cross gcc:
#   cross/build.sh aarch64-unknown-linux-gnu
#   cross/build.sh armv7-unknown-linux-gnueabihf
# The binary lands in target/TARGET/PROFILE/outpost (PROFILE defaults to
# release; CI uses PROFILE=ci-cross, which skips LTO to build faster).
# Installs the cross compiler and C library (apt) and the Rust target
# (rustup) when they are missing: ring, tract-linalg and the bundled SQLite
# compile C and assembly for the target, so the cross gcc is required.
# Extra arguments go to cargo (e.g. --features, --config).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
[ -n "$target" ] || { echo "usage: cross/build.sh TARGET [cargo args...]" >&2; exit 2; }
shift
profile="${PROFILE:-release}"

case "$target" in
  aarch64-unknown-linux-gnu)      gnu=aarch64-linux-gnu;   debarch=arm64 ;;
  armv7-unknown-linux-gnueabihf)  gnu=arm-linux-gnueabihf; debarch=armhf ;;
  *) echo "cross/build.sh: unsupported target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v "$gnu-gcc" >/dev/null || [ ! -d "/usr/$gnu/include" ]; then
  echo "cross/build.sh: installing gcc-$gnu and libc6-dev-$debarch-cross"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "gcc-$gnu" "libc6-dev-$debarch-cross" >/dev/null
fi
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi

# cargo's and the cc crate's names for the target's tools.
var=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${var}_LINKER=$gnu-gcc"
export "CC_${target//-/_}=$gnu-gcc"
export "AR_${target//-/_}=$gnu-ar"
export "CFLAGS_${target//-/_}=${CROSS_CFLAGS:--O2}"
# Linked by rust-lld, the LLVM linker that ships with the Rust toolchain
# (and links x86_64 Linux binaries by default): Debian 12's cross ld cannot
# pack relative relocations for ARM (agent/build.rs; it ignores the flag)
# and has no identical-code folding (--icf=safe). A CARGO_TARGET_*_RUSTFLAGS
# already in the environment wins.
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
rustflags="CARGO_TARGET_${var}_RUSTFLAGS"
[ -n "${!rustflags:-}" ] || export "$rustflags=-Clink-arg=-fuse-ld=lld -Clink-arg=-B$sysroot/lib/rustlib/$host/bin/gcc-ld -Clink-arg=-Wl,--icf=safe"

start=$(date +%s)
cargo build --locked -p outpost --bin outpost --target "$target" --profile "$profile" "$@"
bin="${CARGO_TARGET_DIR:-target}/$target/$profile/outpost"
echo "cross/build.sh: $bin ($(stat -c %s "$bin") bytes, $(( $(date +%s) - start )) s, profile $profile)"
