#!/usr/bin/env bash
# Hello-world A/B of atoll binaries, interleaved: tells two builds apart on
# a noisy machine by their server CPU per request, which moves far less
# than requests/s between runs.
#
#   benches/atoll_ab.sh path/to/atoll-a path/to/atoll-b [rounds]
#   DURATION=6s WARMUP=2s benches/atoll_ab.sh old/atoll new/atoll 5
#   ATOLL_LOG=info benches/atoll_ab.sh old/atoll new/atoll   # with the
#     per-request log lines (written to a file); the default is warn
#
# Each round runs every binary once, pinned like benches/http_compare.sh.
# Needs wrk (installed with apt-get if missing).
. "$(dirname "$0")/lib.sh"
PORT_BASE=${PORT_BASE:-18790}
[ "$#" -ge 2 ] || { echo "usage: $0 ATOLL_BIN ATOLL_BIN... [ROUNDS]" >&2; exit 2; }
rounds=3
if [[ "${*: -1}" =~ ^[0-9]+$ ]]; then rounds=${*: -1}; set -- "${@:1:$(($# - 1))}"; fi
need_apt wrk wrk
need_apt taskset util-linux
need_apt curl curl

cat >"$work/hello.js" <<'JS'
export default { fetch() { return new Response("hello") } };
JS
atoll_config hello.js "$PORT_BASE"
printf '%-6s %-40s %12s %10s %12s %12s\n' round binary "requests/s" "p99 ms" "user us/req" "sys us/req"
for round in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    run ab "$PORT_BASE" env ATOLL_LOG="${ATOLL_LOG:-warn}" "$(realpath "$bin")" node --config node.toml
    printf '%-6s %-40s %12s %10s %12s %12s\n' "$round" "$bin" "${rps[ab]}" "${p99[ab]}" \
      "${user_us[ab]}" "${sys_us[ab]}"
  done
done
