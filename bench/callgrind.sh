#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: a deterministic measure of the gateway's
# user-space work that machine noise does not move (timed runs on this shared machine vary by ±10%).
#
#   bench/callgrind.sh [BIN|hyper]...     default: target/release/ccgate and the bare hyper proxy
#   N=4000 C=16 bench/callgrind.sh        requests counted, concurrency
#   BODY=100k bench/callgrind.sh          request body from bench/payloads.py: 2k (default), 100k, 1m
#   STREAM=1 bench/callgrind.sh           streams instead (sse-load; EVENTS content events each, sent
#                                         back to back), counted per stream. Events coalesce into
#                                         reads differently from run to run under valgrind, so one
#                                         binary's count moves by up to a fifth: compare builds
#                                         over alternating runs, not one run each
#
# Each gateway runs under `valgrind --tool=callgrind` over two in-tree mock upstreams; after 2000
# warm-up requests the counters are zeroed, N non-streaming requests (a Claude-Code-shaped body from
# bench/payloads.py) are sent with oha, and the total is dumped. The profile stays in $OUT/<name>/ for
# `callgrind_annotate` (for example `--inclusive=yes`). The database writer's flush interval is set
# to an hour, so a flush (every 5 s by default) never lands in one count and not in another: the
# count is the request path alone. Needs valgrind (apt-get install valgrind),
# oha, and the release builds bench/run.sh makes (ccgate and bench/mock-upstream).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4000}; C=${C:-16}
OUT=${OUT:-bench/results/callgrind}
T=bench/mock-upstream/target/release
mkdir -p "$OUT/payloads"
python3 bench/payloads.py "$OUT/payloads" >/dev/null
STREAM=${STREAM:-0}; EVENTS=${EVENTS:-20}
BODY=$OUT/payloads/${BODY:-2k}
if ((STREAM)); then BODY+=-stream; fi
BODY+=.json
[[ -f $BODY ]] || { echo "BODY must be one of 2k, 100k, 1m" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install -y valgrind" >&2; exit 1; }
(($#)) || set -- target/release/ccgate hyper
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
# shellcheck source=bench/common.sh
source bench/common.sh
"$T/mock-upstream" --port 0 >"$OUT/mock-a.log" 2>&1 &
"$T/mock-upstream" --port 0 >"$OUT/mock-b.log" 2>&1 &
A=$(addr "$OUT/mock-a.log"); B=$(addr "$OUT/mock-b.log")
for bin in "$@"; do
    name=$(basename "$bin"); d=$OUT/$name; rm -rf "$d"; mkdir -p "$d/data"
    if [[ $bin == hyper ]]; then
        cmd=("$T/bare-proxy" --port 0 --upstream "$A" --upstream "$B")
    else
        two_endpoints "$d/config.toml" "$A" "$B" "" $'[storage]\nflush_interval = "1h"\n\n'
        cmd=("$bin" serve --config "$d/config.toml")
    fi
    XDG_DATA_HOME=$d/data XDG_STATE_HOME=$d/data RUST_LOG=warn \
        valgrind --tool=callgrind --callgrind-out-file="$d/callgrind.out" "${cmd[@]}" >"$d/gateway.log" 2>&1 &
    pid=$!
    url=http://$(addr "$d/gateway.log")/v1/messages
    if ((STREAM)); then
        load() { "$T/sse-load" --url "$url" -c "$C" --streams "$1" --body "$BODY" \
            -H "x-mock-events: $EVENTS" -H 'x-mock-pace-ms: 0' --expect-events $((EVENTS + 6)); }
    else
        load() { oha -n "$1" -c "$C" -m POST -D "$BODY" -H 'content-type: application/json' \
            -H 'anthropic-version: 2023-06-01' --no-tui --output-format json "$url"; }
    fi
    load 2000 >/dev/null
    callgrind_control -z "$pid" >/dev/null
    load "$N" >"$d/load.json"
    callgrind_control -d "$pid" >/dev/null
    sleep 0.5; kill "$pid"; wait "$pid" 2>/dev/null || true
    file=$(ls -t "$d"/callgrind.out.* 2>/dev/null | head -n1); file=${file:-$d/callgrind.out}
    total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    if ((STREAM)); then
        ok=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["completed"], "streams,", j["errors"], "errors")' "$d/load.json")
        unit=stream
    else
        ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["statusCodeDistribution"])' "$d/load.json")
        unit=request
    fi
    printf '%-10s %8d instructions per %s   (%s; %s)\n' "$name" $((total / N)) "$unit" "$ok" "$file"
done
