#!/usr/bin/env bash
# Footprint benchmark: outpost at 1 Hz with 5 targets (processes and
# probes) beside prometheus-node-exporter scraped once a second and monit
# with a 1 s cycle and one HTTP check. After a warm-up, measures each
# daemon's RSS, CPU share of one core and bytes written (/proc/PID/io),
# extrapolated to a day.
#
#   benches/footprint.sh                 # 90 s warm-up, 120 s measured
#   WARMUP=60 MEASURE=660 benches/footprint.sh   # long enough to span flushes
set -euo pipefail
cd "$(dirname "$0")/.."
# 90 s: past the start-up page release a minute after start (agent/src/memtrim.rs),
# so the window measures the steady state; the peak column still shows start-up.
WARMUP=${WARMUP:-90}
MEASURE=${MEASURE:-120}
. benches/lib.sh

install_missing prometheus-node-exporter:prometheus-node-exporter monit:monit curl:curl
cargo build --release --locked -p outpost --bin outpost >/dev/null

work=$(mktemp -d "${TMPDIR:-/var/tmp}/outpost-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

HTTP_PORT=$(free_port); NE_PORT=$(free_port); MONIT_PORT=$(free_port)

# A service for the probes to check.
mkdir -p "$work/www" && echo ok > "$work/www/healthz"
(cd "$work/www" && exec python3 -m http.server "$HTTP_PORT" --bind 127.0.0.1 >/dev/null 2>&1) & pids+=($!)
sleep 600000 & pids+=($!)

cat > "$work/outpost.toml" <<TOML
[agent]
node_id = "bench"
state_dir = "$work/state"
sample_interval_ms = 1000

[store]
flush_interval = "${FLUSH:-10m}"

[[target]]
name = "web"
kind = "process"
process = "python3"
probe = { http = "http://127.0.0.1:$HTTP_PORT/healthz", interval_ms = 1000 }

[[target]]
name = "exporter"
kind = "process"
process = "prometheus-node-exporter"
probe = { tcp = "127.0.0.1:$NE_PORT", interval_ms = 1000 }

[[target]]
name = "monit"
kind = "process"
process = "monit"

[[target]]
name = "sleeper"
kind = "process"
process = "sleep"

[[target]]
name = "host-web"
kind = "host"
probe = { tcp = "127.0.0.1:$HTTP_PORT", interval_ms = 1000 }
TOML

cat > "$work/monitrc" <<MONIT
set daemon 1
set logfile $work/monit.log
set idfile $work/monit.id
set statefile $work/monit.state
check host web with address 127.0.0.1
  if failed port $HTTP_PORT protocol http request "/healthz" with timeout 1 seconds then alert
MONIT
chmod 600 "$work/monitrc"

prometheus-node-exporter --web.listen-address="127.0.0.1:$NE_PORT" >/dev/null 2>&1 & NE=$!; pids+=($NE)
monit -I -c "$work/monitrc" >/dev/null 2>&1 & MONIT=$!; pids+=($MONIT)
target/release/outpost --log-format text run --config "$work/outpost.toml" 2>"$work/outpost.log" & OUTPOST=$!; pids+=($OUTPOST)
( while sleep 1; do curl -s -o /dev/null "http://127.0.0.1:$NE_PORT/metrics"; done ) & pids+=($!)

echo "warming up ${WARMUP}s" >&2
sleep "$WARMUP"
declare -A t0 w0 c0
for p in $OUTPOST $NE $MONIT; do t0[$p]=$(ticks $p); w0[$p]=$(wbytes $p); c0[$p]=$(wchar $p); done
echo "measuring ${MEASURE}s" >&2
sleep "$MEASURE"
hz=$(getconf CLK_TCK)
printf '| daemon | RSS MiB | of which heap (RssAnon) | of which files (RssFile) | peak RSS MiB | CPU %% of one core | disk bytes written/day | write() bytes/day |\n|---|---|---|---|---|---|---|---|\n'
for entry in "outpost:$OUTPOST" "prometheus-node-exporter (scraped 1 Hz):$NE" "monit (1 s cycle, 1 HTTP check):$MONIT"; do
  name=${entry%:*}; p=${entry##*:}
  dt=$(( $(ticks $p) - t0[$p] )); dw=$(( $(wbytes $p) - w0[$p] )); dc=$(( $(wchar $p) - c0[$p] ))
  awk -v n="$name" -v rss="$(kib $p VmRSS)" -v an="$(kib $p RssAnon)" -v fi="$(kib $p RssFile)" -v hwm="$(kib $p VmHWM)" -v dt="$dt" -v hz="$hz" -v s="$MEASURE" -v dw="$dw" -v dc="$dc" \
    'BEGIN{printf "| %s | %.1f | %.1f | %.1f | %.1f | %.2f | %.1f MB | %.1f MB |\n", n, rss/1024, an/1024, fi/1024, hwm/1024, 100*dt/hz/s, dw*86400/s/1e6, dc*86400/s/1e6}'
done
echo
echo "machine: $(machine_line), warm-up ${WARMUP}s, measured ${MEASURE}s"
echo "outpost log lines at WARN/ERROR:"; grep -E ' (WARN|ERROR) ' "$work/outpost.log" | head -5 || true
ls -l "$work/state" | sed 's/^/  /'
if [ -n "${KEEP_DB:-}" ]; then cp "$work/state/outpost.db"* "$(dirname "$KEEP_DB")/" 2>/dev/null; cp "$work/state/outpost.db" "$KEEP_DB"; fi
