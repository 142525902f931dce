#!/usr/bin/env bash
# Recovery benchmark: time from a hung HTTP service (SIGSTOP) to the first
# successful answer after its restart, under a real systemd in an nspawn
# container, outpost (500 ms probe, `for = "2 samples"`) side by side with
# monit 5.33 (`set daemon 1`, HTTP check with a 1 s timeout). Each tool
# supervises alone, one after the other, in the same container. Prints a
# markdown table (p50/p95/max, nearest rank) and the exact configs used.
# The work is done by tests/examples/recovery.rs (see its header).
#
#   benches/recovery.sh                  # 20 trials per tool (as root)
#   TRIALS=30 benches/recovery.sh
#   benches/recovery.sh --tools outpost  # extra arguments go to the program
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-20}

need=()
command -v monit >/dev/null || need+=(monit)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --locked -p outpost --bin outpost >/dev/null
cargo build --release --locked -p outpost-tests --example recovery >/dev/null
exec target/release/examples/recovery --trials "$TRIALS" --outpost target/release/outpost "$@"
