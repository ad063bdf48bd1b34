#!/usr/bin/env bash
# Hello-world user-space instructions per request, Atoll vs `deno serve`,
# counted by valgrind's callgrind. Unlike requests/s and CPU time, the
# count repeats within a fraction of a percent on this noisy VM, so it tells
# builds apart that timing cannot (it does not see the kernel, nor cache
# misses: a change must still show in benches/http_compare.sh).
#
#   benches/instructions.sh
#   ATOLL_BIN=path/to/atoll benches/instructions.sh   # skip the build
#   SERVERS="atoll" benches/instructions.sh          # Atoll only
#   KEEP=dir benches/instructions.sh                 # keep NAME.cg for callgrind_annotate
#   WORKLOAD=post benches/instructions.sh            # 1 KiB POSTs read with request.text()
#   WORKLOAD=api benches/instructions.sh             # URL, one header, Response.json
#   SERVERS="atoll deno hyper" benches/instructions.sh   # plus the floor: hyper
#                                                      # alone (benches/hyper_floor.rs)
#   CACHE=1 benches/instructions.sh                  # also callgrind's simulated
#                                                      # cache misses and branch mispredictions
#
# Each server runs under callgrind pinned to one core, with wrk on the
# other; counting is switched on only for the measured part of the load.
# Atoll's CPU and wall-clock limits are raised, since everything runs about
# 50 times slower under valgrind. Needs valgrind (installed if missing).
#
# The count moves with how many requests the server managed under
# valgrind (fewer requests per isolate poll cost more each): a run that
# served far fewer requests than the others reads a few hundred higher.
# Tell builds apart by alternating them, several runs each.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18770}
DURATION=${DURATION:-10s}
SERVERS=${SERVERS:-atoll deno}
setup_tools
need_apt valgrind valgrind

workload "${WORKLOAD:-hello}"
wrk_args=()
[ -n "${WRK_SCRIPT:-}" ] && wrk_args=(-s "$WRK_SCRIPT")
atoll_config hello.js "$PORT_BASE" "[limits]
cpu_ms = 10000
wall_ms = 60000"

# count NAME PORT CMD...: instructions per request of CMD under load.
count() {
  local name=$1 port=$2 i
  shift 2
  step "$name under callgrind: $*"
  # Any variables the caller set before `count` reach the server.
  local sim=()
  [ -n "${CACHE:-}" ] && sim=(--cache-sim=yes --branch-sim=yes)
  start_pinned "$SERVER_CPU" "$name" valgrind --tool=callgrind "${sim[@]}" --smc-check=all-non-file \
    --instr-atstart=no --callgrind-out-file="$work/$name.cg" "$@"
  local pid=$last_pid
  for i in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$port/" -o /dev/null 2>/dev/null && break
    sleep 0.1
  done
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d5s "${wrk_args[@]}" "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  local out
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "${wrk_args[@]}" "http://127.0.0.1:$port/")
  callgrind_control -i off "$pid" >/dev/null
  # callgrind writes its counts as the server exits; a graceful shutdown
  # under valgrind takes a while.
  kill -INT "$pid" 2>/dev/null || true
  for i in $(seq 1 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local requests total
  requests=$(echo "$out" | awk '/ requests in / { print $1 }')
  total=$(callgrind_annotate "$work/$name.cg" 2>/dev/null |
    awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' || true)
  if [ -z "$total" ] || [ -z "$requests" ]; then
    echo "$name: no callgrind counts (did it exit cleanly?); its log:" >&2
    tail -20 "$work/$name.log" >&2
    return 1
  fi
  printf '%-8s %10s requests %14s instructions %8d per request\n' \
    "$name" "$requests" "$total" "$((total / requests))"
  if [ -n "${CACHE:-}" ]; then
    # Per request, from the simulated caches (the host's sizes) and branch
    # predictor: L1 instruction misses, L1 data read and write misses, and
    # mispredicted conditional and indirect branches.
    callgrind_annotate "$work/$name.cg" 2>/dev/null | awk -v n="$requests" -v name="$name" '
      /^Events shown:/ { for (i = 3; i <= NF; i++) col[$i] = i - 2 }
      /PROGRAM TOTALS/ {
        for (i = 1; i <= NF; i++) gsub(",", "", $i)
        # Each count is followed by its percentage in parentheses.
        j = 0
        for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) { j++; val[j] = $i }
        printf "%-8s per request: I1 misses %.1f, D1 read misses %.1f, D1 write misses %.1f, mispredicted branches %.1f\n",
          name, val[col["I1mr"]] / n, val[col["D1mr"]] / n, val[col["D1mw"]] / n,
          (val[col["Bcm"]] + val[col["Bim"]]) / n
        exit
      }' || true  # callgrind_annotate's broken pipe once awk exits
  fi
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$work/$name.cg" "$KEEP/$name.cg"
    echo "$requests" >"$KEEP/$name.requests"
  fi
}

# Builds benches/hyper_floor.rs (dist profile, as atoll); prints its path.
hyper_floor() {
  step "building the hyper floor (benches/hyper_floor.rs, dist profile)"
  # Cargo also builds the package's binary for a bench: pick the bench's.
  (cd "$root" && cargo build --profile dist --quiet --bench hyper_floor --message-format json) |
    grep '"name":"hyper_floor"' |
    awk -F'"executable":"' 'NF > 1 { split($2, p, "\""); if (p[1] != "") exe = p[1] } END { print exe }'
}

for s in $SERVERS; do
  case $s in
    # valgrind follows no exec: the environment goes in directly, not via env(1).
    atoll) ATOLL_LOG=warn count atoll "$PORT_BASE" "$atoll" node --config node.toml ;;
    # The real binary, not a node launcher: valgrind must run deno itself.
    deno) count deno "$((PORT_BASE + 1))" "$(readlink -f "$deno")" serve --quiet --port "$((PORT_BASE + 1))" hello.js ;;
    # No JavaScript: it answers hello world to every workload.
    hyper) count hyper "$((PORT_BASE + 2))" "$(hyper_floor)" "$((PORT_BASE + 2))" ;;
  esac
done
