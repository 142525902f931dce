#!/usr/bin/env bash
# Soak: the real `outpost run` for DURATION seconds at 20x the default
# pace, with faults firing and the broker flapping, sampled every
# SAMPLE_EVERY seconds for what would show a leak: RSS, open fds, threads,
# the store's files and the outbox backlog. Prints first/last/max of each
# and a verdict per figure; the raw samples, the agent's log and the
# run's config go to target/soak/.
#
# At 20x: sample_interval_ms = 50 (default 1000), features window 3 s and
# step 500 ms (default 60 s / 10 s, so the same 60 samples a window and 10 a
# step), store flush 30 s (default 10 min), summary every 3 s (default 60 s),
# probes every 50 ms (default 1 s). The store has small limits (retention
# 10 min, max_db_mb 4, the least allowed) and so does the outbox (64 rows).
#
# What happens meanwhile:
#  - soak-svc, a small HTTP service this script supervises (restarted at
#    once when it dies), misbehaves every FAULT_EVERY s after FAULT_START s,
#    in turn: hangs (SIGSTOP: its probe fails), spins a core, grows its
#    memory by 32 MiB a second. Rules act on each with a [[command]]
#    (kill it, so the supervisor restarts it; or SIGHUP it, which calms it),
#    and the detectors see the same excursions (a notify rule on anomaly).
#    A fault the agent has not fixed by the next one is undone by the
#    script and counted as unfixed.
#  - mosquitto (the uplink's broker) is stopped for BROKER_DOWN s every
#    BROKER_EVERY s, first at BROKER_START s; a rule notifies while its
#    probe fails. A subscriber counts what reaches the broker.
#
# Verdicts: RSS flat (max of the last third within RSS_MARGIN_PCT % of the
# max of the middle third), fds and threads not growing (max of the last
# third at most FD_SLACK / THREAD_SLACK over the middle third's), the
# database file under max_db_mb and the WAL under 2 MiB (the store's
# journal_size_limit) + one autocheckpoint (900 pages), the outbox within
# its 64 rows, the audit's hash chain intact. Exit 1 when a verdict fails.
#
#   benches/soak.sh                     # 30 minutes
#   DURATION=120 benches/soak.sh        # a quick try
#   PROFILE=release benches/soak.sh     # the published build (fat LTO: slow)
#   OUTPOST=target/debug/outpost DURATION=120 benches/soak.sh   # no build
#
# The store's retention and size limit run when the agent starts and then
# every hour (store/writer.rs, RETENTION_EVERY): a run shorter than that
# sees only the pass at start, so run DURATION=3900 to see one enforced
# while the agent runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
DURATION=${DURATION:-1800}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
FAULT_START=${FAULT_START:-90}
FAULT_EVERY=${FAULT_EVERY:-40}
BROKER_START=${BROKER_START:-120}
BROKER_EVERY=${BROKER_EVERY:-180}
BROKER_DOWN=${BROKER_DOWN:-45}
PROFILE=${PROFILE:-ci-cross}
RSS_MARGIN_PCT=${RSS_MARGIN_PCT:-5}
FD_SLACK=${FD_SLACK:-2}
THREAD_SLACK=${THREAD_SLACK:-2}
MAX_DB_MB=4
OUTBOX_MAX_ROWS=64

install_missing /usr/sbin/mosquitto:mosquitto mosquitto_sub:mosquitto-clients python3:python3
built="given as OUTPOST"
if [ -z "${OUTPOST:-}" ]; then
  built="profile $PROFILE, built from $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- agent Cargo.lock 2>/dev/null || echo ' with uncommitted changes in agent/')"
  echo "building outpost ($built)" >&2
  cargo build --locked --profile "$PROFILE" -p outpost --bin outpost >/dev/null
  dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
  OUTPOST=target/$dir/outpost
fi
OUTPOST=$(realpath "$OUTPOST")

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=target/soak; mkdir -p "$out"; out=$(realpath "$out")
csv=$out/soak-$stamp.csv
work=$(mktemp -d "${TMPDIR:-/var/tmp}/outpost-soak.XXXXXX")
mkdir -p "$work/bin" "$work/state"
pids=()
cleanup() {
  touch "$work/stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in broker.pid svc.pid sub.pid; do
    [ -s "$work/$f" ] || continue
    kill -CONT "$(cat "$work/$f")" 2>/dev/null || true
    kill "$(cat "$work/$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

SVC_PORT=$(free_port); MQTT_PORT=$(free_port)

# The service that misbehaves. A script, so its comm is "soak-svc".
# The interpreter itself, not env(1) or a wrapper (pyenv's shim) whose exec
# would make the comm "python3".
echo "#!$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')" > "$work/bin/soak-svc"
cat >> "$work/bin/soak-svc" <<'PY'
# GET /healthz: 200. GET /state: spin=0|1 grow=0|1 hog_mb=N. SIGUSR1 spins
# a core, SIGUSR2 grows memory by 32 MiB a second (up to 320 MiB), SIGHUP
# calms both.
import http.server, signal, sys, threading, time
state = {"spin": 0, "grow": 0}
hog = []
def calm(*_):
    state["spin"] = state["grow"] = 0
    hog.clear()
signal.signal(signal.SIGUSR1, lambda *_: state.update(spin=1))
signal.signal(signal.SIGUSR2, lambda *_: state.update(grow=1))
signal.signal(signal.SIGHUP, calm)
def spinner():
    while True:
        if state["spin"]:
            x = 0
            for i in range(200000):
                x += i
        else:
            time.sleep(0.05)
def grower():
    while True:
        time.sleep(1)
        if state["grow"] and len(hog) < 10:
            hog.append(bytearray(b"\x01") * (32 << 20))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok\n"
        if self.path == "/state":
            body = ("spin=%d grow=%d hog_mb=%d\n" % (state["spin"], state["grow"], 32 * len(hog))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
threading.Thread(target=spinner, daemon=True).start()
threading.Thread(target=grower, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever(poll_interval=0.1)
PY
# shellcheck disable=SC2016 # expanded by the command, not here
printf '#!/bin/sh\nkill -KILL "$(cat %s/svc.pid)"\n' "$work" > "$work/bin/svc-kill"
# shellcheck disable=SC2016
printf '#!/bin/sh\nkill -HUP "$(cat %s/svc.pid)"\n' "$work" > "$work/bin/svc-calm"
chmod +x "$work/bin/"*

cat > "$work/outpost.toml" <<TOML
[agent]
node_id = "soak"
state_dir = "$work/state"
sample_interval_ms = 50

[store]
retention = "10m"
max_db_mb = $MAX_DB_MB
flush_interval = "30s"

[features]
window = "3s"
step = "500ms"

[[target]]
name = "svc"
kind = "process"
process = "soak-svc"
probe = { http = "http://127.0.0.1:$SVC_PORT/healthz", interval_ms = 50, timeout_ms = 50 }

[[target]]
name = "broker"
kind = "process"
process = "mosquitto"
probe = { tcp = "127.0.0.1:$MQTT_PORT", interval_ms = 50, timeout_ms = 50 }

[[rule]]
name = "svc-hung"
target = "svc"
when = "probe_failed"
for = "1s"
do = "exec:svc-kill"
mode = "auto"
cooldown = "5s"
max_per_hour = 120
verify = "probe_ok within 10s"

[[rule]]
name = "svc-spin"
target = "svc"
when = "cpu_pct > 30"
for = "1s"
do = "exec:svc-calm"
mode = "auto"
cooldown = "5s"
max_per_hour = 120
verify = "condition_clear within 10s"

[[rule]]
name = "svc-bloat"
target = "svc"
when = "rss_mb > 150"
for = "1s"
do = "exec:svc-kill"
mode = "auto"
cooldown = "5s"
max_per_hour = 120
verify = "probe_ok within 10s"

[[rule]]
name = "svc-anomaly"
target = "svc"
when = "anomaly >= 0.8"
do = "notify"
mode = "auto"
cooldown = "10s"
max_per_hour = 600

[[rule]]
name = "broker-down"
target = "broker"
when = "probe_failed"
for = "2s"
do = "notify"
mode = "auto"
cooldown = "10s"
max_per_hour = 600

[[command]]
name = "svc-kill"
argv = ["$work/bin/svc-kill"]
timeout = "5s"

[[command]]
name = "svc-calm"
argv = ["$work/bin/svc-calm"]
timeout = "5s"

[guard]
max_actions_per_hour = 1000

[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
keepalive = "5s"
summary_interval = "3s"
outbox_max_rows = $OUTBOX_MAX_ROWS
reconnect_min = "1s"
reconnect_max = "5s"
TOML
"$OUTPOST" check-config "$work/outpost.toml" >/dev/null
cp "$work/outpost.toml" "$out/soak-$stamp.toml"

printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nuser root\n' "$MQTT_PORT" > "$work/mosquitto.conf"
broker_up() { mosquitto -c "$work/mosquitto.conf" 2>/dev/null & echo $! > "$work/broker.pid"; }
broker_up
for _ in $(seq 50); do python3 -c "import socket;socket.create_connection(('127.0.0.1',$MQTT_PORT),1)" 2>/dev/null && break; sleep 0.1; done

# The supervisor: soak-svc again 0.2 s after it dies.
( while [ ! -e "$work/stopping" ]; do
    "$work/bin/soak-svc" "$SVC_PORT" & echo $! > "$work/svc.pid"
    wait $! || true
    [ -e "$work/stopping" ] || echo "$(date +%s) restart" >> "$work/svc.log"
    sleep 0.2
  done ) 2>>"$work/svc.err" & pids+=($!)

# What reaches the broker (mosquitto_sub exits when it cannot connect).
( while [ ! -e "$work/stopping" ]; do
    mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t 'outpost/v1/nodes/soak/#' -v -q 1 >> "$work/received.txt" 2>/dev/null &
    echo $! > "$work/sub.pid"; wait $! || true; sleep 1
  done ) & pids+=($!)

sleep 1
"$OUTPOST" --log-format text run --config "$work/outpost.toml" 2>"$work/outpost.log" & AGENT=$!; pids+=("$AGENT")
t0=$(date +%s)
end=$((t0 + DURATION))

svc_state() { python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:$SVC_PORT/state',timeout=2).read().decode().strip())" 2>/dev/null || echo down; }

# The faults, in turn; each one gets FAULT_EVERY s to be fixed.
( sleep "$FAULT_START"; i=0; kinds=(hang spin grow)
  while [ "$(date +%s)" -lt $((end - FAULT_EVERY)) ]; do
    kind=${kinds[i % 3]}; pid=$(cat "$work/svc.pid")
    case $kind in hang) sig=STOP ;; spin) sig=USR1 ;; grow) sig=USR2 ;; esac
    kill -"$sig" "$pid" 2>/dev/null || true
    echo "$(date +%s) $kind $pid" >> "$work/faults.log"
    sleep "$FAULT_EVERY"
    if [ "$(cat "$work/svc.pid")" = "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo '?')
      if [ "$st" = T ]; then
        kill -CONT "$pid" || true; echo "$(date +%s) unfixed $kind $pid" >> "$work/faults.log"
      elif [ "$kind" != hang ] && [ "$(svc_state)" != "spin=0 grow=0 hog_mb=0" ]; then
        kill -HUP "$pid" || true; echo "$(date +%s) unfixed $kind $pid" >> "$work/faults.log"
      fi
    fi
    i=$((i + 1))
  done ) & pids+=($!)

# The broker flaps.
( sleep "$BROKER_START"
  while [ "$(date +%s)" -lt $((end - BROKER_DOWN)) ]; do
    b=$(cat "$work/broker.pid"); kill "$b" || true; wait "$b" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$b" 2>/dev/null || break; sleep 0.1; done
    echo "$(date +%s) down" >> "$work/broker.log"
    sleep "$BROKER_DOWN"
    broker_up; echo "$(date +%s) up" >> "$work/broker.log"
    sleep $((BROKER_EVERY - BROKER_DOWN))
  done ) & pids+=($!)

db=$work/state/outpost.db
# outbox rows, feature rows, age of the oldest feature row (s), used bytes
# (pages in use x page size), audit rows, incidents.
db_counts() {
  python3 - "$db" <<'PY' 2>/dev/null || echo ",,,,,"
import sqlite3, sys, time
c = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True, timeout=5)
q = lambda s: c.execute(s).fetchone()[0]
oldest = q("SELECT min(ts_first_ms) FROM features")
used = (q("PRAGMA page_count") - q("PRAGMA freelist_count")) * q("PRAGMA page_size")
print("%d,%d,%s,%d,%d,%d" % (q("SELECT count(*) FROM outbox"), q("SELECT count(*) FROM features"),
      "" if oldest is None else "%.0f" % (time.time() - oldest / 1000), used,
      q("SELECT count(*) FROM actions"), q("SELECT count(*) FROM incidents")))
PY
}
fsize() { stat -c %s "$1" 2>/dev/null || echo 0; }
# Lines of FILE that grep ARGS… match (0 when FILE is missing).
count() { if [ -f "$1" ]; then grep -c "${@:2}" "$1" || true; else echo 0; fi; }

echo "soak: $OUTPOST, ${DURATION}s, a sample every ${SAMPLE_EVERY}s; machine: $(machine_line)" >&2
echo "t_s,rss_kib,rss_anon_kib,hwm_kib,fds,threads,cpu_ticks,db_bytes,wal_bytes,outbox_rows,feature_rows,oldest_feature_s,db_used_bytes,audit_rows,incidents,broker_up,faults,svc_restarts,received,load1" > "$csv"
while :; do
  now=$(date +%s)
  kill -0 "$AGENT" 2>/dev/null || { echo "the agent exited early; its log:" >&2; tail -20 "$work/outpost.log" >&2; exit 1; }
  bup=0; kill -0 "$(cat "$work/broker.pid")" 2>/dev/null && bup=1
  echo "$((now - t0)),$(kib $AGENT VmRSS),$(kib $AGENT RssAnon),$(kib $AGENT VmHWM),$(nfds $AGENT),$(nthreads $AGENT),$(ticks $AGENT),$(fsize "$db"),$(fsize "$db-wal"),$(db_counts),$bup,$(count "$work/faults.log" -Ev "unfixed"),$(count "$work/svc.log" restart),$(count "$work/received.txt" .),$(cut -d' ' -f1 /proc/loadavg)" >> "$csv"
  [ "$now" -ge "$end" ] && break
  sleep $(( SAMPLE_EVERY < end - now ? SAMPLE_EVERY : end - now ))
done

kill -TERM "$AGENT"; wait "$AGENT" || true
touch "$work/stopping"
# Without the terminal colours the text format writes even to a file.
log=$out/soak-$stamp.log
sed 's/\x1b\[[0-9;]*m//g' "$work/outpost.log" > "$log"
cat "$work/faults.log" "$work/broker.log" 2>/dev/null | sort -n > "$out/soak-$stamp.events" || true
chain=$("$OUTPOST" actions --state-dir "$work/state" --verify-chain 2>&1 | tail -1) && chain_ok=1 || chain_ok=0
audit=$(python3 - "$db" <<'PY'
import sqlite3, sys
c = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
for rule, action, decision, n in c.execute("SELECT coalesce(rule, '-'), action, decision, count(*) FROM actions GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"):
    print("  %-12s %-14s %-12s %d" % (rule, action, decision, n))
PY
)

rc=0
(set -o pipefail; python3 - "$csv" "$MAX_DB_MB" "$OUTBOX_MAX_ROWS" "$RSS_MARGIN_PCT" "$FD_SLACK" "$THREAD_SLACK" "$(getconf CLK_TCK)" <<'PY' | tee "$out/soak-$stamp.summary"
import csv, sys
path, max_db_mb, outbox_max, margin, fd_slack, th_slack, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
rows = list(csv.DictReader(open(path)))
def col(k):
    return [float(r[k]) if r[k] not in ("", None) else None for r in rows]
n = len(rows)
a, b = n // 3, 2 * n // 3
span = float(rows[-1]["t_s"]) - float(rows[0]["t_s"])
print(f"{n} samples over {span:.0f} s; agent CPU {100 * (float(rows[-1]['cpu_ticks']) - float(rows[0]['cpu_ticks'])) / hz / max(span, 1):.1f} % of one core")
print(f"| figure | first | last | max | max 1st third | max 2nd third | max last third |")
print(f"|---|---|---|---|---|---|---|")
figs = [("rss_kib", "VmRSS KiB"), ("rss_anon_kib", "RssAnon KiB"), ("fds", "open fds"), ("threads", "threads"),
        ("db_bytes", "db file bytes"), ("wal_bytes", "WAL file bytes"), ("db_used_bytes", "db bytes in use"),
        ("outbox_rows", "outbox rows"), ("feature_rows", "feature rows"), ("oldest_feature_s", "oldest feature s"),
        ("audit_rows", "audit rows"), ("incidents", "incidents"), ("faults", "faults injected"),
        ("svc_restarts", "soak-svc restarts"), ("received", "messages at the broker")]
def mx(v):
    v = [x for x in v if x is not None]
    return max(v) if v else None
def f(x):
    return "-" if x is None else f"{x:.0f}"
for k, name in figs:
    v = col(k)
    known = [x for x in v if x is not None]
    print(f"| {name} | {f(known[0] if known else None)} | {f(known[-1] if known else None)} | {f(mx(v))} | {f(mx(v[:a]))} | {f(mx(v[a:b]))} | {f(mx(v[b:]))} |")
def slope(k, lo):
    pts = [(float(r["t_s"]), float(r[k])) for r in rows[lo:] if r[k] != ""]
    if len(pts) < 2:
        return 0.0
    mt = sum(t for t, _ in pts) / len(pts); mv = sum(x for _, x in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    return 3600 * sum((t - mt) * (x - mv) for t, x in pts) / den if den else 0.0
ok = True
def verdict(name, good, text):
    global ok
    ok &= good
    print(f"verdict: {name}: {'PASS' if good else 'FAIL'}: {text}")
print()
rss = col("rss_kib")
m2, m3 = mx(rss[a:b]), mx(rss[b:])
verdict("RSS flat", m3 <= m2 * (1 + margin / 100),
        f"max of last third {m3:.0f} KiB vs middle third {m2:.0f} KiB (margin {margin:g} %); "
        f"trend over the last two thirds {slope('rss_kib', a):+.0f} KiB/h")
for k, name, slack in (("fds", "fds not growing", fd_slack), ("threads", "threads not growing", th_slack)):
    v = col(k)
    verdict(name, mx(v[b:]) <= mx(v[a:b]) + slack,
            f"max of last third {mx(v[b:]):.0f} vs middle third {mx(v[a:b]):.0f} (slack {slack}); trend {slope(k, a):+.1f}/h")
dbmax, walmax = mx(col("db_bytes")), mx(col("wal_bytes"))
wal_cap = 2 * 1024 * 1024 + 900 * (1024 + 24) + 32
verdict("store bounded", dbmax <= max_db_mb * 1024 * 1024 and walmax <= wal_cap,
        f"db file max {dbmax / 1048576:.2f} MiB (max_db_mb = {max_db_mb}), WAL max {walmax / 1048576:.2f} MiB (cap {wal_cap / 1048576:.2f}); "
        f"db grew {slope('db_bytes', a) / 1048576:+.2f} MiB/h over the last two thirds")
ob = mx(col("outbox_rows"))
verdict("outbox bounded", ob is not None and ob <= outbox_max, f"max {ob:.0f} rows (outbox_max_rows = {outbox_max})")
sys.exit(0 if ok else 3)
PY
) || rc=$?
{
  echo "audit hash chain: $([ "$chain_ok" = 1 ] && echo intact || echo BROKEN) ($chain)"
  echo "audit rows by rule, action, decision:"; echo "$audit"
  echo "faults injected: $(count "$work/faults.log" -Ev unfixed) ($(count "$work/faults.log" -E '^[0-9]+ hang ') hang, $(count "$work/faults.log" -E '^[0-9]+ spin ') spin, $(count "$work/faults.log" -E '^[0-9]+ grow ') grow), not fixed by the agent within ${FAULT_EVERY}s: $(count "$work/faults.log" unfixed); soak-svc restarts: $(count "$work/svc.log" restart)"
  echo "broker outages: $(count "$work/broker.log" ' down') x ${BROKER_DOWN}s"
  echo "messages at the broker by kind: $(awk '{n=split($1,p,"/"); k[p[n]]++} END{for (x in k) printf "%s %d  ", x, k[x]}' "$work/received.txt" 2>/dev/null)"
  echo "store retention passes that removed rows: $(count "$log" 'store retention removed')"
  { grep 'store retention removed' "$log" || true; } | sed -E 's/^[^ ]+ +INFO [^ ]+ /  /'
  echo "uplink: $(count "$log" 'mqtt connected') connects; after an outage, down_ms $( { grep -o 'down_ms=[0-9]*' "$log" || true; } | cut -d= -f2 | sort -n | awk '{v[NR]=$1} END{if (NR) printf "min %d, median %d, max %d", v[1], v[int((NR+1)/2)], v[NR]; else printf "-"}')"
  echo "agent log lines: $(count "$log" -E ' ERROR ') at ERROR, $(count "$log" -E ' WARN ') at WARN, by message:"
  # "LEVEL module: message" without its key=value fields.
  { grep -E ' (WARN|ERROR) ' "$log" || true; } | sed -E 's/^[^ ]+ +//; s/ [a-z_.]+=.*//' | cut -c1-100 | sort | uniq -c | sort -rn | head -8
  echo "agent: $OUTPOST ($built), $(realpath --relative-to=. "$csv")"
  echo "machine: $(machine_line), $(date -u +%F)"
} | tee -a "$out/soak-$stamp.summary"
[ "$chain_ok" = 1 ] || rc=1
[ "$rc" = 0 ] || exit 1
