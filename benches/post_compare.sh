#!/usr/bin/env bash
# Request bodies: a handler that reads a 1 KiB POST body with
# `await request.text()` and answers with its length, on Atoll and on
# `deno serve`, one after the other (interleaved with ROUNDS=N).
#
#   benches/post_compare.sh
#   ROUNDS=3 ATOLL_BIN=target/dist/atoll benches/post_compare.sh
#
# Pinned like benches/http_compare.sh. Needs cargo and npm; installs wrk
# with apt-get and deno from npm.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18770}
setup_tools

# The echo module and its 1 KiB POSTs (`workload post` in lib.sh).
workload post
p_atoll=$PORT_BASE p_deno=$((PORT_BASE + 1))
atoll_config hello.js "$p_atoll"

serve_atoll() { run atoll "$p_atoll" env ATOLL_LOG=warn "$atoll" node --config node.toml; }
serve_deno() { run deno "$p_deno" "$deno" serve --quiet --port "$p_deno" hello.js; }
rounds atoll deno

echo
echo "1 KiB POST bodies read with request.text(): $CONNECTIONS connections, $DURATION, server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
report atoll deno
