#!/usr/bin/env bash
# Two ccgate builds side by side: the same two mock upstreams, the binaries alternated run by run,
# `oha` at one concurrency; prints each run's p50 latency, req/s and the gateway's CPU per request
# (utime + stime of all its threads over the timed run). For differences too small for one
# bench/run.sh (a change's cost at c=1, say), compare the medians over the rounds.
#
#   bench/ab.sh OLD_BIN NEW_BIN                 2 KB body, c=1, 4 rounds of 5 s (after 2 s warm-up)
#   BODY=100k C=64 R=6 D=10 bench/ab.sh A B     body from bench/payloads.py, concurrency, rounds, seconds
#
# Needs oha and the release build of bench/mock-upstream (bench/run.sh makes both).
set -euo pipefail
cd "$(dirname "$0")/.."
(($# >= 2)) || { echo "usage: bench/ab.sh BIN_A BIN_B [BIN...]" >&2; exit 2; }
T=bench/mock-upstream/target/release
C=${C:-1}; D=${D:-5}; R=${R:-4}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$OUT"' EXIT
python3 bench/payloads.py "$OUT" >/dev/null
BODY_FILE=$OUT/${BODY:-2k}.json
[[ -f $BODY_FILE ]] || { echo "BODY must be one of 2k, 100k, 1m" >&2; exit 2; }
# shellcheck source=bench/common.sh
source bench/common.sh
"$T/mock-upstream" --port 0 >"$OUT/mock-a.log" 2>&1 &
"$T/mock-upstream" --port 0 >"$OUT/mock-b.log" 2>&1 &
A=$(addr "$OUT/mock-a.log"); B=$(addr "$OUT/mock-b.log")
two_endpoints "$OUT/config.toml" "$A" "$B"
# utime + stime of a process (all its threads), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
load() { oha -z "$1" -c "$C" -m POST -D "$BODY_FILE" -H 'content-type: application/json' \
    -H 'anthropic-version: 2023-06-01' --no-tui --output-format json "$2"; }
for r in $(seq "$R"); do
    for bin in "$@"; do
        rm -rf "$OUT/data"; mkdir -p "$OUT/data"
        XDG_DATA_HOME=$OUT/data XDG_STATE_HOME=$OUT/data RUST_LOG=warn \
            "$bin" serve --config "$OUT/config.toml" >"$OUT/gw.log" 2>&1 &
        pid=$!
        url=http://$(addr "$OUT/gw.log")/v1/messages
        load 2s "$url" >/dev/null
        cpu0=$(cpu_ticks "$pid")
        load "${D}s" "$url" >"$OUT/run.json"
        cpu1=$(cpu_ticks "$pid")
        python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); s=j["summary"]; n=s["requestsPerSec"]*s["total"]; print("round %s  %-40s p50 %.3f ms  %.0f req/s  %.1f us CPU per request" % (sys.argv[3], sys.argv[2], j["latencyPercentiles"]["p50"]*1000, s["requestsPerSec"], (int(sys.argv[5]) - int(sys.argv[4])) / int(sys.argv[6]) * 1e6 / n))' \
            "$OUT/run.json" "$bin" "$r" "$cpu0" "$cpu1" "$(getconf CLK_TCK)"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
done
