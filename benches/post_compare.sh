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

cat >"$work/echo.js" <<'JS'
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
p_atoll=$PORT_BASE p_deno=$((PORT_BASE + 1))
atoll_config echo.js "$p_atoll"

serve_atoll() { run atoll "$p_atoll" env ATOLL_LOG=warn "$atoll" node --config node.toml; }
serve_deno() { run deno "$p_deno" "$deno" serve --quiet --port "$p_deno" echo.js; }
rounds atoll deno

echo
echo "1 KiB POST bodies read with request.text(): $CONNECTIONS connections, $DURATION, server on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU"
report atoll deno
