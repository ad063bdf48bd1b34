#!/usr/bin/env bash
# Hello-world throughput and latency: Atoll vs `deno serve` vs workerd.
#
# The same module runs on each server in turn. Each server is pinned to one
# core (taskset), wrk to another, with the same connections and duration.
# Prints requests/s and p50/p99 latency per server and Atoll's ratios.
#
#   benches/http_compare.sh            # defaults below
#   DURATION=30s CONNECTIONS=128 benches/http_compare.sh
#
# Needs: cargo, npm (deno and workerd are installed from npm into
# target/bench-tools), wrk and taskset (installed with apt-get if missing).
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=${WARMUP:-3s}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
DENO_VERSION=${DENO_VERSION:-2.9.6}
WORKERD_VERSION=${WORKERD_VERSION:-1.20261117.1}
PORT_BASE=${PORT_BASE:-18780}

root=$(cd "$(dirname "$0")/.." && pwd)
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
need_apt wrk wrk
need_apt taskset util-linux

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

if [ -n "${RUSTY_V8_ARCHIVE:-}" ] || [ ! -f "$root/../shared/v8/librusty_v8_release_x86_64-unknown-linux-gnu.a.gz" ]; then :; else
  RUSTY_V8_ARCHIVE="$(realpath "$root/../shared/v8/librusty_v8_release_x86_64-unknown-linux-gnu.a.gz")"
  export RUSTY_V8_ARCHIVE
fi
step "building atoll (release)"
(cd "$root" && cargo build --release --quiet --bin atoll)
atoll="$root/target/release/atoll"

cat >"$work/hello.js" <<'EOF'
export default { fetch() { return new Response("hello") } };
EOF

p_atoll=$PORT_BASE p_deno=$((PORT_BASE + 1)) p_workerd=$((PORT_BASE + 2))
cat >"$work/node.toml" <<EOF
[node]
threads = 1

[[listen]]
addr = "127.0.0.1:$p_atoll"

[admin]
addr = "127.0.0.1:0"

[[scripts]]
name = "hello"
entry = "hello.js"

[[routes]]
pattern = "*"
script = "hello"
EOF
cat >"$work/workerd.capnp" <<EOF
using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .hello) ],
  sockets = [ (name = "http", address = "127.0.0.1:$p_workerd", http = (), service = "main") ],
);
const hello :Workerd.Worker = (
  modules = [ (name = "hello.js", esModule = embed "hello.js") ],
  compatibilityDate = "2025-01-01",
);
EOF

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

declare -A rps p50 p99
# Converts wrk's "1.23ms" / "850.00us" / "1.01s" to milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n = n * 1000
    printf "%.3f", n }'
}

run() {
  local name=$1 port=$2
  shift 2
  step "$name: $*"
  (cd "$work" && exec taskset -c "$SERVER_CPU" "$@" >"$work/$name.log" 2>&1) &
  pids+=($!)
  local pid=$!
  wait_up "$port" "$name"
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "http://127.0.0.1:$port/" >/dev/null
  local out
  out=$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$port/")
  echo "$out" >&2
  rps[$name]=$(echo "$out" | awk '/^Requests\/sec:/ { print $2 }')
  p50[$name]=$(to_ms "$(echo "$out" | awk '$1 == "50%" { print $2 }')")
  p99[$name]=$(to_ms "$(echo "$out" | awk '$1 == "99%" { print $2 }')")
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "warning: $name had errors (see above)" >&2
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Per-request log lines are an operator choice; the others print none.
run atoll "$p_atoll" env ATOLL_LOG=warn "$atoll" node --config node.toml
run deno "$p_deno" "$deno" serve --quiet --port "$p_deno" hello.js
run workerd "$p_workerd" "$workerd" serve workerd.capnp

echo
echo "hello world, $CONNECTIONS connections, $DURATION, server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
printf '%-10s %12s %10s %10s\n' server "requests/s" "p50 ms" "p99 ms"
for s in atoll deno workerd; do
  printf '%-10s %12s %10s %10s\n' "$s" "${rps[$s]}" "${p50[$s]}" "${p99[$s]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "atoll / workerd: $(ratio "${rps[atoll]}" "${rps[workerd]}")x requests/s (target >= 1.3), p99 $(ratio "${p99[atoll]}" "${p99[workerd]}")x"
echo "atoll / deno:    $(ratio "${rps[atoll]}" "${rps[deno]}")x requests/s (target >= 1.0), p99 $(ratio "${p99[atoll]}" "${p99[deno]}")x"
