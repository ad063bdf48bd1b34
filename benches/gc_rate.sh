#!/usr/bin/env bash
# Young-generation garbage per request (hello world unless $WORKLOAD says), Atoll vs `deno serve`:
# each server runs with V8's --trace-gc under the usual pinned wrk load, and
# the memory its scavenges freed is divided by the requests served.
#
#   benches/gc_rate.sh
#   ATOLL_BIN=path/to/atoll SERVERS=atoll benches/gc_rate.sh
#   WORKLOAD=api benches/gc_rate.sh   # another module from `workload` in lib.sh
#   V8_FLAGS="--trace-gc --trace-opt" KEEP=dir benches/gc_rate.sh   # other V8
#     traces too, each server's log kept as dir/NAME.log
#
# V8 writes its traces to standard output with block buffering: the servers
# run under `stdbuf -o0`, or the lines of the last seconds are lost when
# the server is stopped.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18830}
SERVERS=${SERVERS:-atoll deno}
V8_FLAGS=${V8_FLAGS:---trace-gc}
setup_tools
workload "${WORKLOAD:-hello}"
wrk_args=()
[ -n "${WRK_SCRIPT:-}" ] && wrk_args=(-s "$WRK_SCRIPT")
atoll_config hello.js "$PORT_BASE"

# measure NAME PORT CMD...: requests served in $DURATION and the MB its
# scavenges freed meanwhile.
measure() {
  local name=$1 port=$2
  shift 2
  start_warm "$name" "$port" "$@"
  local pid=$last_pid log="$work/$name.log"
  local before out after requests
  before=$(wc -l <"$log")
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "${wrk_args[@]}" \
    "http://127.0.0.1:$port/")
  sleep 0.5
  after=$(wc -l <"$log")
  requests=$(echo "$out" | awk '/requests in/ { print $1 }')
  # "Scavenge 5.2 (10.0) -> 2.0 (10.0) MB": heap in use before and after.
  sed -n "$((before + 1)),${after}p" "$log" | awk -v name="$name" -v n="$requests" '
    /Scavenge/ {
      split($0, a, "Scavenge "); split(a[2], b, " ")
      split(a[2], c, "-> "); split(c[2], d, " ")
      freed += b[1] - d[1]; scavenges++
    }
    END {
      printf "%-6s %9d requests %5d scavenges  %6.0f requests per scavenge  %5.2f KB of garbage per request\n",
        name, n, scavenges, scavenges ? n / scavenges : 0, n ? freed * 1024 / n : 0
    }'
  [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$log" "$KEEP/$name.log"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

for s in $SERVERS; do
  case $s in
    atoll)
      measure atoll "$PORT_BASE" stdbuf -o0 -e0 env ATOLL_LOG=warn ATOLL_V8_FLAGS="$V8_FLAGS" \
        "$atoll" node --config node.toml
      ;;
    deno)
      measure deno "$((PORT_BASE + 1))" stdbuf -o0 -e0 "$deno" serve \
        --v8-flags="${V8_FLAGS// /,}" --quiet --port "$((PORT_BASE + 1))" hello.js
      ;;
  esac
done
