#!/usr/bin/env bash
# Runs an ARM build of outpost under qemu-user-static:
#   cross/smoke.sh aarch64-unknown-linux-gnu
#   cross/smoke.sh armv7-unknown-linux-gnueabihf
# Checks `--version`, `check-config` on config/outpost.toml, `replay` on a
# generated value stream against the x86 binary's scores (within 1e-6), and
# `run` for a few seconds (READY, samples stored, clean exit on SIGINT), and
# that `demo` explains it is not in the build (the packages' feature set,
# `--no-default-features`; SMOKE_DEMO=present skips that for a default build).
# BIN overrides the binary (default target/TARGET/$PROFILE/outpost, PROFILE
# defaulting to release); X86_BIN the reference (default target/debug/outpost).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
  aarch64-unknown-linux-gnu)      qemu=qemu-aarch64-static; sysroot=/usr/aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf)  qemu=qemu-arm-static;     sysroot=/usr/arm-linux-gnueabihf ;;
  *) echo "usage: cross/smoke.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf" >&2; exit 2 ;;
esac
profile="${PROFILE:-release}"
bin="${BIN:-target/$target/$profile/outpost}"
x86="${X86_BIN:-target/debug/outpost}"
[ -x "$bin" ] || { echo "smoke: no $bin; run cross/build.sh $target first" >&2; exit 2; }
[ -x "$x86" ] || { echo "smoke: no x86 reference $x86; run cargo build -p outpost --bin outpost" >&2; exit 2; }

if ! command -v "$qemu" >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi
[ -d "$sysroot/lib" ] || { echo "smoke: no $sysroot (libc6-*-cross); run cross/build.sh $target" >&2; exit 2; }

# The binary runs through qemu directly (no binfmt_misc needed), with the
# cross libc as its dynamic loader's root.
arm() { "$qemu" -L "$sysroot" "$bin" "$@"; }
fail() { echo "smoke($target): FAIL: $*" >&2; exit 1; }
ok() { echo "smoke($target): ok: $*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ELF e_machine (offset 18, little-endian): 183 aarch64, 40 arm.
machine=$(od -An -t u2 -j 18 -N 2 "$bin" | tr -d ' ')
case "$target" in aarch64-*) want=183 ;; *) want=40 ;; esac
[ "$machine" = "$want" ] || fail "$bin has ELF machine $machine, not $want"

# The hot code first (agent/build.rs, agent/hot-code.txt): the list was
# profiled on x86 with the default features, so this is where its
# hash-free patterns have to hold, on another target and feature set.
# Its C functions alone (SQLite, zstd) are about 230 KiB; the Rust ones
# bring it past 1 MiB.
hot=$(readelf -SW "$bin" | sed -n 's/^ *\[ *[0-9]*\] *//p' | awk '$1 == ".text.hot" {print $5}')
[ -n "$hot" ] || fail "$bin has no .text.hot section (agent/build.rs)"
hot=$((16#$hot))
[ "$hot" -ge $((512 * 1024)) ] || fail ".text.hot is only $hot bytes: agent/hot-code.txt no longer matches the build's functions"
ok ".text.hot: $((hot / 1024)) KiB of hot code first"

v=$(arm --version) || fail "--version"
[ "$v" = "$("$x86" --version)" ] || fail "--version says $v"
ok "--version: $v"

arm check-config config/outpost.toml >"$work/check.out" 2>&1 || { cat "$work/check.out"; fail "check-config"; }
ok "check-config: $(tail -1 "$work/check.out")"
printf '[agent]\nnode_id = 7\n' >"$work/bad.toml"
set +e; arm check-config "$work/bad.toml" >/dev/null 2>&1; rc=$?; set -e
[ "$rc" -eq 2 ] || fail "check-config of a bad file exited $rc, not 2"
ok "check-config of a bad file exits 2"

# The packaged feature set has no demo; the binary says so instead of failing
# on an unknown command.
if [ "${SMOKE_DEMO:-absent}" = absent ]; then
  set +e; arm demo >"$work/demo.out" 2>&1; rc=$?; set -e
  { [ "$rc" -eq 2 ] && grep -q "not in this build" "$work/demo.out"; } \
    || { cat "$work/demo.out"; fail "demo in a build without it exited $rc"; }
  ok "demo: not in this build (exit 2)"
fi

# A NAB-style value stream: a slow wave with noise, then a burst.
awk 'BEGIN { srand(7); print "timestamp,value";
  for (i = 0; i < 3000; i++) {
    v = 10 + 3 * sin(i / 40) + rand();
    if (i >= 2500 && i < 2530) v += 40;
    printf "2024-01-01 %02d:%02d:%02d,%.6f\n", int(i / 3600), int(i / 60) % 60, i % 60, v } }' >"$work/stream.csv"
arm replay --input "$work/stream.csv" --output "$work/arm.csv" >"$work/arm.txt" || fail "replay"
"$x86" replay --input "$work/stream.csv" --output "$work/x86.csv" >"$work/x86.txt" || fail "x86 replay"
paste -d, "$work/arm.csv" "$work/x86.csv" | awk -F, -v tol=1e-6 '
  NR == 1 { next }
  { n++; d = $2 - $4; if (d < 0) d = -d; if (d > max) max = d; if ($2 > 0.5) alerts++ }
  END { printf "rows=%d max_abs_diff=%g high_scores=%d\n", n, max, alerts; exit !(n == 3000 && max <= tol) }' \
  >"$work/cmp.txt" || { cat "$work/cmp.txt"; fail "replay scores differ from x86"; }
ok "replay matches x86: $(cat "$work/cmp.txt") ($(cat "$work/arm.txt"))"

cat >"$work/run.toml" <<TOML
[agent]
node_id = "smoke-$target"
state_dir = "$work/state"
sample_interval_ms = 200
TOML
set +e
timeout -s INT --preserve-status -k 10 6 "$qemu" -L "$sysroot" "$bin" --log-format text run --config "$work/run.toml" >"$work/run.log" 2>&1
rc=$?
set -e
[ "$rc" -eq 0 ] || { tail -20 "$work/run.log"; fail "run exited $rc after SIGINT"; }
grep -q "collecting" "$work/run.log" || { tail -20 "$work/run.log"; fail "run never started collecting"; }
arm status --json --state-dir "$work/state" >"$work/status.json" || fail "status"
grep -q '"node_id": *"smoke-' "$work/status.json" || grep -q "smoke-$target" "$work/status.json" || { cat "$work/status.json"; fail "status does not show the node"; }
ok "run: collected for 6 s and shut down cleanly on SIGINT"
echo "smoke($target): all passed"
