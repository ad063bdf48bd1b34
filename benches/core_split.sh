#!/usr/bin/env bash
# Where both cores' time goes per hello-world request, Atoll and `deno
# serve` pinned as in benches/http_compare.sh (server on CPU 0, wrk on
# CPU 1): user, system, softirq (interrupts included) and idle time of
# each core, in microseconds per request, from /proc/stat over the wrk run.
#
#   benches/core_split.sh
#   ROUNDS=4 ATOLL_BIN=path/to/atoll benches/core_split.sh
#
# Unlike the servers' own CPU times (`user us/req` in the comparison
# scripts), this also shows the softirq time of loopback TCP, charged to
# no process, and whether wrk's core waited for the server (client idle)
# or the server's for wrk.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18830}
SERVERS=${SERVERS:-atoll deno}
ROUNDS=${ROUNDS:-2}
setup_tools
workload hello
atoll_config hello.js "$PORT_BASE"

# user+nice, system, irq+softirq, idle+iowait clock ticks of CPU $1.
ticks() { awk -v c="cpu$1" '$1 == c { print $2 + $3, $4, $7 + $8, $5 + $6 }' /proc/stat; }

measure() {
  local name=$1 port=$2
  shift 2
  start_warm "$name" "$port" "$@"
  local pid=$last_pid a b out
  a="$(ticks "$SERVER_CPU") $(ticks "$CLIENT_CPU")"
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/")
  b="$(ticks "$SERVER_CPU") $(ticks "$CLIENT_CPU")"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local requests
  requests=$(echo "$out" | awk '/ requests in / { print $1 }')
  awk -v name="$name" -v n="$requests" -v a="$a" -v b="$b" -v hz="$(getconf CLK_TCK)" \
    -v secs="${DURATION%s}" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    k = 1e6 / hz / n  # clock ticks to microseconds per request
    printf "%-6s %9.0f/s  server: user %.2f sys %.2f softirq %.2f idle %.2f | wrk: user %.2f sys %.2f softirq %.2f idle %.2f\n",
      name, n / secs, (y[1]-x[1])*k, (y[2]-x[2])*k, (y[3]-x[3])*k, (y[4]-x[4])*k,
      (y[5]-x[5])*k, (y[6]-x[6])*k, (y[7]-x[7])*k, (y[8]-x[8])*k }'
}

echo "hello workload: $CONNECTIONS connections, $DURATION, server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU; us per request"
for _ in $(seq 1 "$ROUNDS"); do each_server measure; done
