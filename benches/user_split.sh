#!/usr/bin/env bash
# Where a server's CPU time per hello-world request goes, by kind, under the
# pinned load of benches/http_compare.sh: perf samples of the server's
# process split by binary (the kernel, the server, libc, JIT-compiled
# JavaScript, the vDSO's clock reads), in microseconds per request, and the
# share of its user-space samples that fall on or right after (perf's skid)
# a lock-prefixed instruction: atomic read-modify-writes, reference counts,
# mutexes. Deno's binary has no symbols: perf cannot disassemble most of
# its samples, so it gets no such share.
#
#   benches/user_split.sh
#   ATOLL_BIN=path/to/atoll SERVERS=atoll benches/user_split.sh
#
# Needs perf (linux-perf) and gawk (installed with apt-get if missing).
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18810}
SERVERS=${SERVERS:-atoll deno}
FREQ=${FREQ:-4999}
setup_tools
need_apt perf linux-perf
need_apt gawk gawk

workload hello
atoll_config hello.js "$PORT_BASE"

# split NAME PORT CMD...: profiles the server under load, adds its row.
split() {
  local name=$1 port=$2
  shift 2
  start_warm "$name" "$port" "$@"
  local pid=$last_pid child
  # npm's launcher starts the real server as a child.
  while child=$(pgrep -P "$pid" | head -1) && [ -n "$child" ]; do pid=$child; done
  local data="$work/$name.perf"
  perf record -q -F "$FREQ" -o "$data" -p "$pid" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
  local perf_pid=$!
  local out requests
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/")
  wait "$perf_pid" || true
  requests=$(echo "$out" | awk '/ requests in / { print $1 }')
  local samples
  samples=$(perf report -i "$data" --stdio --sort dso 2>/dev/null |
    awk '/^# Samples:/ { n = $3; if (n ~ /K$/) n = n * 1000; print n; exit }')
  # Exact sample counts by binary: shares times the total.
  perf report -i "$data" --stdio --sort dso 2>/dev/null | grep -v '^#' | grep -v '^$' >"$work/$name.dso"
  perf annotate -i "$data" --stdio --no-source 2>/dev/null >"$work/$name.ann" || true
  gawk -v name="$name" -v requests="$requests" -v freq="$FREQ" -v samples="$samples" '
    FNR == NR {
      share = $1; sub(/%/, "", share); dso = $2
      if (dso ~ /kernel/) k += share; else if (dso ~ /JIT/) j += share
      else if (dso ~ /vdso/) v += share; else if (dso ~ /^libc/) c += share
      else if (dso !~ /^lib/) s += share; else o += share
      next
    }
    /Source code & Disassembly of/ {
      match($0, /\(([0-9]+) samples/, m); n = m[1]; prev = 0; vdso = ($0 ~ /\[vdso\]/); next
    }
    /^ +[0-9]+\.[0-9]+ : +[0-9a-f]+:/ {
      x = ($1 + 0) * n / 100; all += x
      locked = ($0 ~ /: +lock /) || ($0 ~ /xchg +[^,]*,\(/) || ($0 ~ /xchg +\(/)
      if (!vdso && (prev || locked)) at_lock += x
      prev = locked
    }
    END {
      us = samples / freq / requests * 1e6 / 100
      # Less than half the user samples disassembled (no symbols): no share.
      user = (100 - k) * samples / 100
      locked = all >= user / 2 ? sprintf("%.1f %%", 100 * at_lock / all) : "n/a"
      printf "%-8s %9d %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %13s\n", name, requests,
        k * us, s * us, c * us, j * us, v * us, o * us, locked
    }' "$work/$name.dso" "$work/$name.ann" >>"$work/table"
  kill "$last_pid" 2>/dev/null || true
  wait "$last_pid" 2>/dev/null || true
}

each_server split

echo
echo "microseconds of the server's CPU per request, $CONNECTIONS connections, $DURATION, perf at $FREQ Hz"
printf '%-8s %9s %8s %8s %8s %8s %8s %8s %13s\n' server requests kernel server libc JIT vdso other "user locked"
cat "$work/table"
