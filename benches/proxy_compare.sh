#!/usr/bin/env bash
# Proxy throughput: a handler that fetches a 1 KiB upstream response and
# returns it, on Atoll and on `deno serve`, one after the other.
#
# The proxy under test is pinned to one core; wrk and the upstream (a
# `deno serve` handler returning 1 KiB) share the other, identical for both.
#
#   benches/proxy_compare.sh
#
# Needs cargo and npm; installs wrk with apt-get and deno from npm.
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18790}
setup_tools

p_up=$PORT_BASE p_atoll=$((PORT_BASE + 1)) p_deno=$((PORT_BASE + 2))
cat >"$work/upstream.js" <<'JS'
const body = "x".repeat(1024);
export default { fetch() { return new Response(body) } };
JS
cat >"$work/proxy.js" <<JS
export default { fetch() { return fetch("http://127.0.0.1:$p_up/") } };
JS
# Loopback is private: open just the upstream for this run.
atoll_config proxy.js "$p_atoll" "[outbound]
allow = [\"127.0.0.1\"]"

start_pinned "$CLIENT_CPU" upstream "$deno" serve --quiet --port "$p_up" upstream.js
wait_up "$p_up" upstream

serve_atoll() { run atoll "$p_atoll" env ATOLL_LOG=warn "$atoll" node --config node.toml; }
serve_deno() { run deno "$p_deno" "$deno" serve --quiet --allow-net=127.0.0.1 --port "$p_deno" proxy.js; }
rounds atoll deno

echo
echo "proxy of a 1 KiB upstream response: $CONNECTIONS connections, $DURATION, proxy on CPU $SERVER_CPU, wrk and upstream on CPU $CLIENT_CPU"
report atoll deno
