#!/usr/bin/env bash
# Fleet-scale benchmark of the uplink (BENCHMARKS.md, "Fleet scale"):
#  1. NODES simulated nodes (tests/examples/fleet_sim.rs: the real MQTT
#     options, backoff and outbox code, one in-memory SQLite outbox per node)
#     against one local mosquitto: connect time, broker bytes per node per
#     day ($SYS counters and computed from the packets), CPU and memory, and
#     the wall time of the real `outpost fleet nodes --json` while they run.
#  2. Outbox drain: DRAIN_EVENTS events written (by the real outbox code)
#     while the broker is down, then the broker starts: the real release
#     `outpost run` empties its outbox (drain-agent), and the real Store +
#     Uplink do in the simulator's process (drain, SIM_PROFILE code).
#  3. `outpost run` (release) with 5 targets, with and without [mqtt], side
#     by side for AGENT_MEASURE seconds: RSS, peak RSS, CPU; and the size of
#     a real summary the agent published.
#
#   benches/fleet.sh                          # 10,000 nodes, 120 s steady
#   NODES=2000 MEASURE=60 AGENT_MEASURE=60 benches/fleet.sh
#   SIM_PROFILE=dev benches/fleet.sh          # unoptimised simulator build
#   SKIP=fleet,drain benches/fleet.sh         # only the agent part
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-10000}
CONNECT_RATE=${CONNECT_RATE:-500}
MEASURE=${MEASURE:-120}
SUMMARY_S=${SUMMARY_S:-60}
EVENT_EVERY_S=${EVENT_EVERY_S:-300}
DRAIN_EVENTS=${DRAIN_EVENTS:-20000}
# Past the start-up page release a minute after start (agent/src/memtrim.rs).
AGENT_WARMUP=${AGENT_WARMUP:-90}
AGENT_MEASURE=${AGENT_MEASURE:-180}
# The simulator's profile. `dev` by default: its deps are usually built
# already, and its own CPU is not a figure here (10,000 nodes at defaults
# take about 10 % of a core unoptimised); `ci-cross` (release without LTO)
# or `release` build the whole tree again.
SIM_PROFILE=${SIM_PROFILE:-dev}
SKIP=${SKIP:-}
# The agent binary; anything but the default is for trying the script out
# (the budget is measured in release).
OUTPOST=${OUTPOST:-target/release/outpost}

. benches/lib.sh
install_missing mosquitto:mosquitto mosquitto_sub:mosquitto-clients python3:python3
# One socket per node in the simulator, one per node in mosquitto (which
# inherits this limit).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((NODES + 200)) ]; then
  echo "warning: RLIMIT_NOFILE $(ulimit -n) < NODES+200; nodes past it cannot connect" >&2
fi

if [ "$OUTPOST" = target/release/outpost ]; then
  echo "building target/release/outpost (release, fat LTO)" >&2
  cargo build --release --locked -p outpost --bin outpost >/dev/null
fi
echo "building the simulator (profile $SIM_PROFILE)" >&2
cargo build --locked --profile "$SIM_PROFILE" -p outpost-tests --example fleet_sim >/dev/null
simdir=$SIM_PROFILE; [ "$SIM_PROFILE" = dev ] && simdir=debug
sim=target/$simdir/examples/fleet_sim

machine() {
  echo "machine: $(machine_line), RLIMIT_NOFILE $(ulimit -n), $(mosquitto -h 2>/dev/null | head -1)"
}
machine

if [[ ",$SKIP," != *,fleet,* ]]; then
  echo "== fleet: $NODES nodes, summary ${SUMMARY_S}s, keepalive 30s, an event every ${EVENT_EVERY_S}s per node (mean), ${MEASURE}s steady"
  "$sim" fleet --nodes "$NODES" --connect-rate "$CONNECT_RATE" --measure-s "$MEASURE" \
    --summary-s "$SUMMARY_S" --event-every-s "$EVENT_EVERY_S" --cli-runs 3 \
    --outpost "$OUTPOST" 2>&1 | grep -v 'should not be run as root'
  machine
fi

if [[ ",$SKIP," != *,drain,* ]]; then
  echo "== drain: $DRAIN_EVENTS events written while the broker is down"
  "$sim" drain-agent --events "$DRAIN_EVENTS" --outpost "$OUTPOST" 2>&1 | grep -v 'should not be run as root'
  "$sim" drain --events "$DRAIN_EVENTS" 2>&1 | grep -v 'should not be run as root'
  machine
fi

[[ ",$SKIP," == *,agent,* ]] && exit 0
echo "== agent: $OUTPOST run, 5 targets, with and without [mqtt]"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/outpost-fleet.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

HTTP_PORT=$(free_port); MQTT_PORT=$(free_port)
mkdir -p "$work/www" && echo ok > "$work/www/healthz"
(cd "$work/www" && exec python3 -m http.server "$HTTP_PORT" --bind 127.0.0.1 >/dev/null 2>&1) & pids+=($!)
sleep 600000 & pids+=($!)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nuser root\n' "$MQTT_PORT" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" 2>/dev/null & pids+=($!)

for variant in plain mqtt; do
  cat > "$work/$variant.toml" <<TOML
[agent]
node_id = "bench-$variant"
state_dir = "$work/state-$variant"
sample_interval_ms = 1000

[[target]]
name = "web"
kind = "process"
process = "python3"
probe = { http = "http://127.0.0.1:$HTTP_PORT/healthz", interval_ms = 1000 }

[[target]]
name = "broker"
kind = "process"
process = "mosquitto"
probe = { tcp = "127.0.0.1:$MQTT_PORT", interval_ms = 1000 }

[[target]]
name = "sleeper"
kind = "process"
process = "sleep"

[[target]]
name = "host-web"
kind = "host"
probe = { tcp = "127.0.0.1:$HTTP_PORT", interval_ms = 1000 }

[[target]]
name = "host-broker"
kind = "host"
probe = { tcp = "127.0.0.1:$MQTT_PORT", interval_ms = 1000 }
TOML
done
printf '\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\n' "$MQTT_PORT" >> "$work/mqtt.toml"

sleep 1
# The real summaries and state, to size them.
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t 'outpost/v1/nodes/bench-mqtt/#' -v -q 1 > "$work/published.txt" & pids+=($!)
"$OUTPOST" --log-format text run --config "$work/plain.toml" 2>"$work/plain.log" & PLAIN=$!; pids+=($PLAIN)
"$OUTPOST" --log-format text run --config "$work/mqtt.toml" 2>"$work/mqtt.log" & MQTT=$!; pids+=($MQTT)

echo "warming up ${AGENT_WARMUP}s" >&2
sleep "$AGENT_WARMUP"
t_plain=$(ticks $PLAIN); t_mqtt=$(ticks $MQTT)
echo "measuring ${AGENT_MEASURE}s" >&2
sleep "$AGENT_MEASURE"
hz=$(getconf CLK_TCK)
printf '| outpost run (%s) | VmRSS MiB | RssAnon MiB | RssFile MiB | VmHWM MiB | CPU %% of one core |\n|---|---|---|---|---|---|\n' "$OUTPOST"
for entry in "without [mqtt]:$PLAIN:$t_plain" "with [mqtt] (uplink connected):$MQTT:$t_mqtt"; do
  IFS=: read -r name p t0 <<<"$entry"
  awk -v n="$name" -v rss="$(kib "$p" VmRSS)" -v an="$(kib "$p" RssAnon)" -v fi="$(kib "$p" RssFile)" -v hwm="$(kib "$p" VmHWM)" -v dt="$(( $(ticks "$p") - t0 ))" -v hz="$hz" -v s="$AGENT_MEASURE" \
    'BEGIN{printf "| %s | %.2f | %.2f | %.2f | %.2f | %.3f |\n", n, rss/1024, an/1024, fi/1024, hwm/1024, 100*dt/hz/s}'
done
echo
echo "published by bench-mqtt (topic: count, mean payload bytes):"
awk '{t=$1; n[t]++; b[t]+=length($0)-length(t)-1} END{for (t in n) printf "  %s: %d, %.0f\n", t, n[t], b[t]/n[t]}' "$work/published.txt"
grep -m1 '/summary ' "$work/published.txt" | cut -d' ' -f2- | head -c 2000; echo
echo "outpost log lines at WARN/ERROR:"; grep -hE ' (WARN|ERROR) ' "$work/plain.log" "$work/mqtt.log" | head -5 || true
machine
