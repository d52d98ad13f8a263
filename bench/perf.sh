#!/usr/bin/env bash
# Where each gateway's CPU goes per request, by `perf record` (cpu-clock sampling, which works in
# a virtual machine without hardware counters): nginx, the bare hyper proxy and ccgate over the same
# two mock upstreams, one after the other, under one load. For each it prints the CPU per request
# (or stream) split into the kernel's copies between sockets and user memory, the rest of the
# kernel, the allocator, libc, and the gateway's own code, then its hottest user-space symbols, in
# µs per request. The profiles stay in $OUT/<target>.data for `perf report -i`.
#
#   bench/perf.sh                          2 KB body, non-streaming, c=64, 8 s sampled per target
#   BODY=100k C=16 bench/perf.sh           body from bench/payloads.py (2k, 100k, 1m), concurrency
#   STREAM=1 BODY=1m bench/perf.sh         streams (sse-load, 20 events 5 ms apart), per stream
#   CCGATE_BIN=target/pgo/ccgate TARGETS="hyper ccgate" bench/perf.sh
#
# Timed figures move with the machine (it is shared); the split between targets in one run is the
# measure. Needs perf (apt-get install linux-perf), oha, nginx and the release builds bench/run.sh
# makes (ccgate and bench/mock-upstream).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench
T=bench/mock-upstream/target/release
C=${C:-64}; D=${D:-8}; STREAM=${STREAM:-0}
CCGATE_BIN=${CCGATE_BIN:-target/release/ccgate}
TARGETS=${TARGETS:-nginx hyper ccgate}
OUT=${OUT:-bench/results/perf}
command -v perf >/dev/null || { echo "perf is needed: apt-get install -y linux-perf" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
rm -rf "$OUT"; mkdir -p "$OUT/payloads"
python3 bench/payloads.py "$OUT/payloads" >/dev/null
BODY_FILE=$OUT/payloads/${BODY:-2k}
((STREAM)) && BODY_FILE+=-stream
BODY_FILE+=.json
[[ -f $BODY_FILE ]] || { echo "BODY must be one of 2k, 100k, 1m" >&2; exit 1; }
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
# shellcheck source=bench/nginx.sh
source "$BENCH/nginx.sh"
# shellcheck source=bench/common.sh
source bench/common.sh
"$T/mock-upstream" --port 0 >"$OUT/mock-a.log" 2>&1 &
"$T/mock-upstream" --port 0 >"$OUT/mock-b.log" 2>&1 &
A=$(addr "$OUT/mock-a.log"); B=$(addr "$OUT/mock-b.log")

load() { # SECONDS URL
    if ((STREAM)); then
        "$T/sse-load" --url "$2" -c "$C" --duration "$1" --body "$BODY_FILE" \
            -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 5' --expect-events 26
    else
        oha -z "${1}s" -c "$C" -m POST -D "$BODY_FILE" -H 'content-type: application/json' \
            -H 'anthropic-version: 2023-06-01' --no-tui --output-format json "$2"
    fi
}
count() { # load's JSON output -> requests (streams) completed
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["completed"] if "completed" in j else sum(j["statusCodeDistribution"].values()))' "$1"
}

for target in $TARGETS; do
    d=$OUT/$target; mkdir -p "$d/data"
    case $target in
        nginx)
            port=$(free_port)
            write_nginx_conf "$d" "$port" 4096 "$(ulimit -n)" "$A" "$B"
            "$NGINX" -e "$d/error.log" -p "$d" -c "$d/nginx.conf" &
            master=$!; url=http://127.0.0.1:$port/v1/messages
            for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
            pids="$master $(pgrep -P "$master" | tr '\n' ' ')" ;;
        hyper)
            "$T/bare-proxy" --port 0 --upstream "$A" --upstream "$B" >"$d/gw.log" 2>&1 &
            master=$!; url=http://$(addr "$d/gw.log")/v1/messages; pids=$master ;;
        ccgate)
            two_endpoints "$d/config.toml" "$A" "$B"
            XDG_DATA_HOME=$d/data XDG_STATE_HOME=$d/data RUST_LOG=warn \
                "$CCGATE_BIN" serve --config "$d/config.toml" >"$d/gw.log" 2>&1 &
            master=$!; url=http://$(addr "$d/gw.log")/v1/messages; pids=$master ;;
        *) echo "unknown target $target" >&2; exit 2 ;;
    esac
    load 2 "$url" >/dev/null
    load $((D + 2)) "$url" >"$d/load.json" &
    lp=$!
    sleep 1
    perf record -q -F 1999 -p "$(echo "$pids" | xargs | tr ' ' ',')" -o "$OUT/$target.data" -- sleep "$D" 2>/dev/null
    wait "$lp"
    n=$(count "$d/load.json")
    kill $master 2>/dev/null; wait $master 2>/dev/null || true
    # Requests completed during the sampled D of the load's D + 2 seconds.
    per=$(awk -v n="$n" -v d="$D" 'BEGIN { print n * d / (d + 2) }')
    perf report -i "$OUT/$target.data" --no-children --sort dso,sym --stdio -g none -F overhead,period,dso,sym 2>/dev/null \
        | grep -v '^#' | sort -k2,2 -rn | awk -v per="$per" -v target="$target" -v unit="$( ((STREAM)) && echo stream || echo request)" '
            NF < 5 { next }
            { period = $2; dso = $3; sym = $5; for (i = 6; i <= NF; i++) sym = sym " " $i
              us = period / 1000 / per          # cpu-clock periods are ns
              total += us
              if (dso == "[kernel.kallsyms]") {
                  if (sym ~ /^_copy_(to|from)_iter$|copy_user|__skb_datagram_iter/) copy += us; else kernel += us
              } else if (sym ~ /^_?mi_|^mi_/) alloc += us
              else if (dso ~ /^libc/) libc += us
              else { own += us; if (n_top < 12) { top[++n_top] = sprintf("    %6.2f  %s", us, substr(sym, 1, 110)) } }
            }
            END {
              printf "%-7s %7.1f µs per %s: kernel copies %.1f, rest of kernel %.1f, allocator %.1f, libc %.1f, own code %.1f\n",
                  target, total, unit, copy, kernel, alloc, libc, own
              for (i = 1; i <= n_top; i++) print top[i]
            }'
done
