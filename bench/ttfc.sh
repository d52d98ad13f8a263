#!/usr/bin/env bash
# Where the time to first content goes (issue #22): the request's way to the upstream and the first
# content event's way back, at several concurrencies, through nginx, the bare hyper proxy and
# ccgate over the same two mocks.
#
#     bench/ttfc.sh                              # CONCURRENCY="1 8 64", REPEATS=2, DURATION=6, 2k
#     BODY=100k CONCURRENCY=64 REPEATS=3 bench/ttfc.sh
#
# sse-load asks the mock upstream to stamp each stream (`x-mock-stamp: 1`): when the request
# reached it, and when it sent the first content event. Both are read on the one system clock, so
# the split leaves out the mock's wait between them (quantised to its timer's millisecond ticks).
# Streams: 20 events 5 ms apart, as in bench/run.sh's sse_c64. Prints one line per run, p50s in
# ms: ttfc (time to first content), up (the request's way), back (the first event's way back).
# Needs nginx and the release builds of bench/mock-upstream (cargo build --release there).
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${CONCURRENCY:-"1 8 64"}; REPEATS=${REPEATS:-2}; DURATION=${DURATION:-6}
BODY=${BODY:-2k}; CCGATE=${CCGATE_BIN:-target/release/ccgate}
T=bench/mock-upstream/target/release
OUT=$PWD/bench/results/ttfc-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$OUT/nginx" "$OUT/xdg"
command -v nginx >/dev/null || { echo "nginx is needed (apt-get install -y nginx)" >&2; exit 1; }
python3 bench/payloads.py "$OUT" >/dev/null
SBODY=$OUT/$BODY-stream.json
[[ -f $SBODY ]] || { echo "BODY must be one of 2k, 100k, 1m" >&2; exit 1; }
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
# shellcheck source=bench/common.sh
source bench/common.sh

"$T/mock-upstream" --port 0 >"$OUT/mock-a.log" 2>&1 &
"$T/mock-upstream" --port 0 >"$OUT/mock-b.log" 2>&1 &
A=$(addr "$OUT/mock-a.log"); B=$(addr "$OUT/mock-b.log")

# nginx as bench/run.sh configures it (bench/nginx.sh).
# shellcheck source=bench/nginx.sh
source bench/nginx.sh
NGINX_PORT=$(free_port); NGINX=127.0.0.1:$NGINX_PORT
write_nginx_conf "$OUT/nginx" "$NGINX_PORT" 4096 "$(ulimit -n)" "$A" "$B"
nginx -e "$OUT/nginx/error.log" -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" &

two_endpoints "$OUT/ccgate.toml" "$A" "$B"
XDG_DATA_HOME=$OUT/xdg XDG_STATE_HOME=$OUT/xdg RUST_LOG=warn "$CCGATE" serve --config "$OUT/ccgate.toml" >"$OUT/ccgate.log" 2>&1 &
CCGATE_ADDR=$(addr "$OUT/ccgate.log")
"$T/bare-proxy" --port 0 --upstream "$A" --upstream "$B" >"$OUT/hyper.log" 2>&1 &
HYPER=$(addr "$OUT/hyper.log")
sleep 1

echo "body $BODY; ${DURATION} s per run; p50 in ms; raw sse-load output in $OUT"
for c in $CONCURRENCY; do
    for rep in $(seq "$REPEATS"); do
        for t in "nginx $NGINX" "hyper $HYPER" "ccgate $CCGATE_ADDR"; do
            set -- $t
            "$T/sse-load" --url "http://$2/v1/messages" -c "$c" --duration "$DURATION" --body "$SBODY" \
                -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 5' --expect-events 26 >"$OUT/$1-c$c-$rep.json"
            python3 - "$OUT/$1-c$c-$rep.json" "$c" "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = lambda k: (d.get(k) or {}).get("p50")
f = lambda v: "  -  " if v is None else f"{v:.3f}"
print(f"c={sys.argv[2]:>3}  {sys.argv[3]:<7} streams {d['completed']:>6}  failed {d['errors']}  "
      f"ttfc {f(p('ttfc_ms'))}  up {f(p('request_path_ms'))}  back {f(p('first_content_relay_ms'))}")
PY
        done
    done
done
