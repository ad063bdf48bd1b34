#!/usr/bin/env bash
# Hello-world throughput and latency: Atoll vs `deno serve` vs workerd.
#
# The same module runs on each server in turn, each pinned to one core
# (taskset), wrk pinned to the other, with the same connections and
# duration. Prints requests/s and p50/p99 latency per server and Atoll's
# ratios. Issue 3's target: Atoll >= 1.3x workerd and >= 1.0x Deno in
# requests/s, p99 no worse than either.
#
#   benches/http_compare.sh
#   DURATION=30s CONNECTIONS=128 benches/http_compare.sh
#   ATOLL_BIN=path/to/atoll benches/http_compare.sh   # skip the build
#   ROUNDS=5 benches/http_compare.sh   # interleaved rounds, median ratios
#   WORKLOAD=api benches/http_compare.sh   # URL, a header, Response.json
#
# This VM moves one binary's requests/s by 30 % within minutes; the
# per-round ratios of interleaved rounds move far less than single runs.
#
# Needs cargo and npm; installs wrk with apt-get and deno/workerd from npm.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18780}
setup_tools

# WORKLOAD=post or api runs another module (see `workload` in lib.sh);
# the issue's target is for the default, hello.
workload "${WORKLOAD:-hello}"
p_atoll=$PORT_BASE p_deno=$((PORT_BASE + 1)) p_workerd=$((PORT_BASE + 2))
atoll_config hello.js "$p_atoll"
cat >"$work/workerd.capnp" <<CAPNP
using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .hello) ],
  sockets = [ (name = "http", address = "127.0.0.1:$p_workerd", http = (), service = "main") ],
);
const hello :Workerd.Worker = (
  modules = [ (name = "hello.js", esModule = embed "hello.js") ],
  compatibilityDate = "2025-01-01",
);
CAPNP

# Per-request log lines are an operator's choice; the others print none.
serve_atoll() { run atoll "$p_atoll" env ATOLL_LOG=warn "$atoll" node --config node.toml; }
serve_deno() { run deno "$p_deno" "$deno" serve --quiet --port "$p_deno" hello.js; }
serve_workerd() { run workerd "$p_workerd" "$workerd" serve workerd.capnp; }
rounds atoll deno workerd

echo
echo "${WORKLOAD:-hello} workload: $CONNECTIONS connections, $DURATION, server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
report atoll deno workerd
