#!/usr/bin/env bash
# NAB on the baseline detector: replays every CSV of the NAB data through
# outpost (release build), scores the results with the NAB scorer
# (model-tools/outpost_model/nab.py) and prints the standard-profile score
# and the replay throughput.
#
#   bash benches/nab.sh [NAB_DATA_DIR] [RESULTS_DIR]
#
# NAB_DATA_DIR defaults to ../shared/data/nab beside the repository;
# RESULTS_DIR to a temporary directory (removed at the end).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-${NAB_DATA:-$repo/../shared/data/nab}}"
data="$(cd "$data" && pwd)"
if [[ -n "${2:-}" ]]; then
    out="$2"; mkdir -p "$out"
else
    out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
fi
cd "$repo"

cargo build --quiet --release --locked -p outpost --bin outpost
run() { target/release/outpost replay --input "$1" --output "$2" --detector baseline; }
via="outpost replay"

rows=0; inproc=0
start=$(date +%s.%N)
while IFS= read -r f; do
    rel="${f#"$data"/}"
    line="$(run "$f" "$out/$rel")"
    n=$(( $(wc -l < "$f") - 1 ))
    rows=$(( rows + n ))
    # replay reports its own time (reading, detecting, writing).
    s="$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$line")"
    [[ -n "$s" ]] && inproc="$(awk -v a="$inproc" -v b="$s" 'BEGIN { printf "%.6f", a + b }')"
done < <(find "$data" -name '*.csv' | sort)
end=$(date +%s.%N)

echo "replayed $rows rows via $via"
python3 - "$rows" "$start" "$end" "$inproc" <<'PY'
import sys
rows, start, end, inproc = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"throughput: {rows / (end - start):,.0f} rows/s end to end (process starts included)")
if inproc > 0:
    print(f"throughput: {rows / inproc:,.0f} rows/s in replay() (read, detect, write)")
PY
PYTHONPATH="$repo/model-tools" python3 -m outpost_model.nab --data "$data" --results "$out" --profile all
