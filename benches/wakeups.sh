#!/usr/bin/env bash
# How a server's answers reach the load generator: per 1,000 hello-world
# requests, how often wrk had to be woken (and the inter-processor
# interrupts that cost the server's core), how many events wrk found per
# epoll_wait, and how many epoll_waits and thread-CPU-clock reads the
# server made. Atoll and `deno serve`, pinned as in benches/http_compare.sh.
#
#   benches/wakeups.sh
#   ATOLL_BIN=path/to/atoll SERVERS="atoll" benches/wakeups.sh
#
# The kernel's half of a request (70 % of the server core's time here)
# includes waking wrk when it sleeps: a server that lets wrk fall asleep
# between answers pays that on its own core. Needs perf (linux-perf).
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18800}
SERVERS=${SERVERS:-atoll deno}
setup_tools
need_apt perf linux-perf

workload hello
atoll_config hello.js "$PORT_BASE"

# measure NAME PORT CMD...: counts under load, per 1,000 requests.
measure() {
  local name=$1 port=$2
  shift 2
  start_warm "$name" "$port" "$@"
  local pid=$last_pid
  local stat="$work/$name.stat" out
  # perf counts on both cores for the whole wrk run; -A splits them by CPU.
  out=$(perf stat -a -A -x, -o "$stat" \
    -e sched:sched_wakeup,irq_vectors:call_function_single_entry \
    -e syscalls:sys_enter_epoll_wait,syscalls:sys_enter_clock_gettime \
    -- taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$port/")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local requests
  requests=$(echo "$out" | awk '/ requests in / { print $1 }')
  awk -F, -v n="$requests" -v s="CPU$SERVER_CPU" -v c="CPU$CLIENT_CPU" -v name="$name" '
    $1 == c && $4 ~ /sched_wakeup/ { wake = $2 }
    $1 == c && $4 ~ /call_function_single/ { ipi = $2 }
    $1 == c && $4 ~ /epoll_wait/ { client_epoll = $2 }
    $1 == s && $4 ~ /epoll_wait/ { server_epoll = $2 }
    $1 == s && $4 ~ /clock_gettime/ { clock = $2 }
    END {
      k = n / 1000
      printf "%-8s %9d %10.1f %8.1f %16.1f %16.1f %14.1f\n", name, n, wake / k, ipi / k,
        n / client_epoll, server_epoll / k, clock / k
    }' "$stat" >>"$work/table"
}

each_server measure

echo
echo "per 1,000 requests, $CONNECTIONS connections, $DURATION; server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
printf '%-8s %9s %10s %8s %16s %16s %14s\n' server requests "wrk woken" IPIs "answers/wrk poll" "server polls" "clock syscalls"
cat "$work/table"
