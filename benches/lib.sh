# Shared by the comparison benchmarks: tools, servers pinned to a core, wrk.
# Source it after setting the defaults below if needed.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=${WARMUP:-3s}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
DENO_VERSION=${DENO_VERSION:-2.9.6}
WORKERD_VERSION=${WORKERD_VERSION:-1.20261117.1}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/target/bench-tools"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*" >&2; }

need_apt() {
  command -v "$1" >/dev/null && return
  step "installing $2 with apt-get"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q "$2" >&2; else sudo apt-get install -y -q "$2" >&2; fi
}

# Installs wrk, taskset, deno and workerd (from npm, into target/bench-tools)
# and builds atoll in release mode. Sets $deno, $workerd, $atoll.
setup_tools() {
  need_apt wrk wrk
  need_apt taskset util-linux
  need_apt curl curl
  if [ ! -x "$tools/node_modules/.bin/deno" ] || [ ! -x "$tools/node_modules/.bin/workerd" ] ||
     ! grep -q "\"version\": \"$DENO_VERSION\"" "$tools/node_modules/deno/package.json" 2>/dev/null ||
     ! grep -q "\"version\": \"$WORKERD_VERSION\"" "$tools/node_modules/workerd/package.json" 2>/dev/null; then
    step "installing deno@$DENO_VERSION and workerd@$WORKERD_VERSION from npm into $tools"
    mkdir -p "$tools"
    (cd "$tools" && npm install --no-audit --no-fund --loglevel=error \
      "deno@$DENO_VERSION" "workerd@$WORKERD_VERSION" >&2)
  fi
  deno="$tools/node_modules/.bin/deno"
  workerd="$tools/node_modules/.bin/workerd"
  local archive="$root/../shared/v8/librusty_v8_release_x86_64-unknown-linux-gnu.a.gz"
  if [ -z "${RUSTY_V8_ARCHIVE:-}" ] && [ -f "$archive" ]; then
    RUSTY_V8_ARCHIVE="$(realpath "$archive")"
    export RUSTY_V8_ARCHIVE
  fi
  if [ -n "${ATOLL_BIN:-}" ]; then
    # A release binary built elsewhere (e.g. with symbols, for profiling).
    atoll=$(realpath "$ATOLL_BIN")
    return
  fi
  # The dist profile (fat LTO, one codegen unit) is how Deno builds its
  # release binary too.
  step "building atoll (dist profile; the first build takes about 20 minutes on 2 cores)"
  (cd "$root" && cargo build --profile dist --quiet --bin atoll)
  atoll="$root/target/dist/atoll"
}

# Waits until http://127.0.0.1:$1/ answers; shows $2's log if it never does.
wait_up() {
  local port=$1 name=$2 i
  for i in $(seq 1 200); do
    if curl -fsS "http://127.0.0.1:$port/" -o /dev/null 2>/dev/null; then return; fi
    sleep 0.05
  done
  echo "$name did not come up on port $port; its log:" >&2
  cat "$work/$name.log" >&2
  exit 1
}

# Starts `$@` in $work on CPU $1 in the background, logging to $work/$2.log.
start_pinned() {
  local cpu=$1 name=$2
  shift 2
  (cd "$work" && exec taskset -c "$cpu" "$@" >"$work/$name.log" 2>&1) &
  pids+=($!)
  last_pid=$!
}

# Converts wrk's "1.23ms" / "850.00us" / "1.01s" to milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n = n * 1000
    printf "%.3f", n }'
}

# User and system CPU clock ticks of process $1 and all its descendants
# (npm's launchers start the real server as a child).
tree_ticks() {
  local pids=("$1") i=0 p
  while [ "$i" -lt "${#pids[@]}" ]; do
    for p in $(pgrep -P "${pids[$i]}" 2>/dev/null || true); do pids+=("$p"); done
    i=$((i + 1))
  done
  for p in "${pids[@]}"; do cat "/proc/$p/stat" 2>/dev/null || true; done |
    awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }'
}

# start_warm NAME PORT CMD...: starts the server pinned to $SERVER_CPU
# (its pid in $last_pid), waits until it answers, and warms it up with
# $WARMUP of wrk pinned to $CLIENT_CPU.
start_warm() {
  local name=$1 port=$2
  shift 2
  step "$name: $*"
  start_pinned "$SERVER_CPU" "$name" "$@"
  wait_up "$port" "$name"
  local script=()
  [ -n "${WRK_SCRIPT:-}" ] && script=(-s "$WRK_SCRIPT")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "${script[@]}" "http://127.0.0.1:$port/" >/dev/null
}

declare -A rps p50 p99 user_us sys_us
# run NAME PORT CMD...: starts the server pinned to $SERVER_CPU, warms it up,
# then loads it with wrk pinned to $CLIENT_CPU and records the results,
# including the server's CPU time per request (user and system): unlike
# requests/s, that barely moves with the VM's noise.
run() {
  local name=$1 port=$2
  shift 2
  start_warm "$name" "$port" "$@"
  local pid=$last_pid
  # $WRK_SCRIPT (a wrk Lua file), when set, shapes the requests.
  local script=()
  [ -n "${WRK_SCRIPT:-}" ] && script=(-s "$WRK_SCRIPT")
  local out before after requests
  before=$(tree_ticks "$pid")
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${script[@]}" "http://127.0.0.1:$port/")
  after=$(tree_ticks "$pid")
  echo "$out" >&2
  rps[$name]=$(echo "$out" | awk '/^Requests\/sec:/ { print $2 }')
  p50[$name]=$(to_ms "$(echo "$out" | awk '$1 == "50%" { print $2 }')")
  p99[$name]=$(to_ms "$(echo "$out" | awk '$1 == "99%" { print $2 }')")
  requests=$(echo "$out" | awk '/ requests in / { print $1 }')
  read -r user_us["$name"] sys_us["$name"] < <(awk -v b="$before" -v a="$after" \
    -v n="$requests" -v hz="$(getconf CLK_TCK)" 'BEGIN {
      split(b, x, " "); split(a, y, " ")
      printf "%.1f %.1f\n", (y[1] - x[1]) * 1e6 / hz / n, (y[2] - x[2]) * 1e6 / hz / n }')
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "warning: $name had errors (see above)" >&2
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

ROUNDS=${ROUNDS:-1}
declare -A round_row
# rounds NAME...: runs each server (the caller's function `serve_NAME`,
# which calls `run NAME ...`) one after another, $ROUNDS times over,
# interleaved so the VM's slow and fast minutes fall on all of them alike.
# Each round starts one server further along the list, so no server always
# runs first or always right after the same other one. Keeps every round's
# row (requests/s, p50, p99, user and system µs per request) for `report`;
# rps, p50, p99, user_us and sys_us end up holding each server's median
# round (by requests/s).
rounds() {
  local r i name median
  local names=("$@")
  for r in $(seq 1 "$ROUNDS"); do
    for i in "${!names[@]}"; do
      name=${names[$(((i + r - 1) % ${#names[@]}))]}
      "serve_$name"
      round_row[$name,$r]="${rps[$name]} ${p50[$name]} ${p99[$name]} ${user_us[$name]} ${sys_us[$name]}"
    done
  done
  for name in "$@"; do
    median=$(for r in $(seq 1 "$ROUNDS"); do echo "${round_row[$name,$r]}"; done |
      sort -g -k1,1 | awk '{ row[NR] = $0 } END { print row[int((NR + 1) / 2)] }')
    read -r "rps[$name]" "p50[$name]" "p99[$name]" "user_us[$name]" "sys_us[$name]" <<<"$median"
  done
}

# Prints the table for servers "$@" (their median round when there were
# several) and atoll's ratio to each other one: per round, and the median
# of those ratios. With the server's core saturated, its CPU time per
# request (user + system) sets requests/s and moves less between rounds,
# so its ratio is printed too (below 1: Atoll spends less).
report() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
  local s r
  if [ "$ROUNDS" -gt 1 ]; then
    echo "$ROUNDS interleaved rounds; each server's median round (by requests/s):"
  fi
  printf '%-10s %12s %10s %10s %12s %12s\n' server "requests/s" "p50 ms" "p99 ms" "user us/req" "sys us/req"
  for s in "$@"; do
    printf '%-10s %12s %10s %10s %12s %12s\n' "$s" "${rps[$s]}" "${p50[$s]}" "${p99[$s]}" \
      "${user_us[$s]}" "${sys_us[$s]}"
  done
  echo
  for s in "$@"; do
    [ "$s" = atoll ] && continue
    if [ "$ROUNDS" -le 1 ]; then
      awk -v a="${rps[atoll]}" -v b="${rps[$s]}" -v pa="${p99[atoll]}" -v pb="${p99[$s]}" -v s="$s" \
        'BEGIN { printf "atoll / %-8s %.2fx requests/s, p99 %.2fx\n", s ":", a / b, pa / pb }'
      continue
    fi
    for r in $(seq 1 "$ROUNDS"); do
      # Atoll's row, then the other server's (see `rounds`).
      echo "${round_row[atoll,$r]} ${round_row[$s,$r]}"
    done | awk -v s="$s" '
      { q[NR] = $1 / $6; l[NR] = $3 / $8; qs = qs sprintf(" %.2f", q[NR]); ls = ls sprintf(" %.2f", l[NR])
        c[NR] = $9 + $10 > 0 ? ($4 + $5) / ($9 + $10) : 0; cs = cs sprintf(" %.2f", c[NR]) }
      function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      END {
        printf "atoll / %-8s requests/s by round%s, median %.2fx\n", s ":", qs, median(q, NR)
        printf "%-17s p99 by round%s, median %.2fx\n", "", ls, median(l, NR)
        printf "%-17s server CPU per request by round%s, median %.2fx\n", "", cs, median(c, NR)
      }'
  done
}

# Writes the module for workload $1 to $work/hello.js (every script serves
# that file) and sets WRK_SCRIPT to the wrk Lua file its requests need:
#   hello  export default { fetch() { return new Response("hello") } }
#   post   1 KiB POST bodies read with request.text()
#   api    new URL(request.url), one header read, Response.json; requests
#          carry five browser-like headers
#   stream a ReadableStream body of two chunks
workload() {
  WRK_SCRIPT=
  case $1 in
    hello)
      cat >"$work/hello.js" <<'JS'
export default { fetch() { return new Response("hello") } };
JS
      ;;
    post)
      cat >"$work/hello.js" <<'JS'
export default {
  async fetch(request) {
    const text = await request.text();
    return new Response(text.length + "\n");
  },
};
JS
      cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "text/plain"
LUA
      WRK_SCRIPT="$work/post.lua"
      ;;
    api)
      cat >"$work/hello.js" <<'JS'
export default {
  fetch(request) {
    const url = new URL(request.url);
    return Response.json({ path: url.pathname, agent: request.headers.get("user-agent") });
  },
};
JS
      cat >"$work/api.lua" <<'LUA'
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) bench"
wrk.headers["Accept"] = "application/json, text/plain, */*"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br"
wrk.headers["Cookie"] = "session=0123456789abcdef; theme=dark"
LUA
      WRK_SCRIPT="$work/api.lua"
      ;;
    stream)
      cat >"$work/hello.js" <<'JS'
const enc = new TextEncoder();
export default {
  fetch() {
    const body = new ReadableStream({
      start(c) {
        c.enqueue(enc.encode("hello "));
        c.enqueue(enc.encode("world"));
        c.close();
      },
    });
    return new Response(body);
  },
};
JS
      ;;
    *) echo "unknown workload $1 (hello, post, api or stream)" >&2; exit 2 ;;
  esac
}

# A node.toml serving $work/$1 for every host on port $2, one worker thread,
# with extra config $3.
atoll_config() {
  cat >"$work/node.toml" <<TOML
[node]
threads = 1

[[listen]]
addr = "127.0.0.1:$2"

[admin]
addr = "127.0.0.1:0"

[[scripts]]
name = "bench"
entry = "$1"

[[routes]]
pattern = "*"
script = "bench"

${3:-}
TOML
}

# each_server FN: calls `FN NAME PORT CMD...` for each of $SERVERS (atoll,
# deno) that serves hello.js from $work, on ports from $PORT_BASE.
each_server() {
  local fn=$1 s
  for s in $SERVERS; do
    case $s in
      atoll) "$fn" atoll "$PORT_BASE" env ATOLL_LOG=warn "$atoll" node --config node.toml ;;
      deno) "$fn" deno "$((PORT_BASE + 1))" "$deno" serve --quiet --port "$((PORT_BASE + 1))" hello.js ;;
    esac
  done
}
