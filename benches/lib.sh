# shellcheck shell=bash
# Helpers shared by the benchmark scripts (source it: `. benches/lib.sh`).

# Installs the Debian packages given as COMMAND:PACKAGE pairs whose command
# is missing (an absolute COMMAND is tested as a file).
install_missing() {
  local need=() pair cmd
  for pair in "$@"; do
    cmd=${pair%%:*}
    if [[ $cmd == /* ]]; then [ -x "$cmd" ] && continue; else command -v "$cmd" >/dev/null && continue; fi
    need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# User + system CPU clock ticks of PID so far.
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# A KiB field of /proc/PID/status: `kib PID VmRSS` (VmHWM, RssAnon, RssFile…).
kib() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }

# Bytes written to storage (`write_bytes`) and by write() calls (`wchar`).
wbytes() { awk '/^write_bytes/{print $2}' "/proc/$1/io"; }
wchar() { awk '/^wchar/{print $2}' "/proc/$1/io"; }

# Open file descriptors and threads of PID.
nfds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
nthreads() { find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# One line about the machine, for the figures.
machine_line() {
  echo "$(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
