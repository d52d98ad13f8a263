#!/usr/bin/env bash
# The HTTP/2-to-upstreams experiment of issue #22: what does multiplexing a worker's streams on
# shared HTTP/2 connections save in memory per stream, and what does it cost in CPU? HTTP/1.1
# against HTTP/2 (h2c, prior knowledge) to the same two mocks, for the bare hyper proxy
# (bench/mock-upstream's `bare-proxy`, ccgate's threading with none of its features) and for
# ccgate itself (its endpoints with `http2 = true`).
#
#     bench/h2.sh                         # REPEATS=3, slow rounds of 1000 and 4000 streams
#     REPEATS=1 STREAMS="1000 10000" TARGETS="ccgate-h1 ccgate-h2" bench/h2.sh
#
# A round of N streams needs 2N descriptors in an HTTP/1.1 proxy and N in an HTTP/2 one; rounds
# above the open-file limit are skipped (so 10000 streams run over HTTP/2 only, where the hard
# limit is 20000). Per repeat, alternating the targets (fresh proxies for every measurement):
#   slow     N concurrent streams of 20 events 200 ms apart (2k body): peak PSS of the proxy;
#            the slope per stream is taken between the smallest and the largest N
#   sse_c64  streams of 20 events 5 ms apart at concurrency 64 for DURATION s: CPU per stream
#   ns_c64   non-streaming requests (2k body) at concurrency 64 for DURATION s (oha): throughput
#            and CPU per request
# Prints medians; raw numbers go to bench/results/h2-<timestamp>/runs.tsv. Needs the release
# builds of bench/mock-upstream (cargo build --release there) and oha; raises the open-file limit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}; STREAMS=${STREAMS:-"1000 4000"}; DURATION=${DURATION:-10}
TARGETS=${TARGETS:-"hyper-h1 hyper-h2 ccgate-h1 ccgate-h2"}
CCGATE=${CCGATE_BIN:-target/release/ccgate}
T=bench/mock-upstream/target/release
OUT=bench/results/h2-$(date -u +%Y%m%dT%H%M%SZ); mkdir -p "$OUT"
python3 bench/payloads.py "$OUT" >/dev/null
BODY=$OUT/2k.json; SBODY=$OUT/2k-stream.json
[[ -f $SBODY ]] || SBODY=$(ls "$OUT"/2k*stream* | head -n1)
ulimit -n "$(ulimit -Hn)"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
CLK_TCK=$(getconf CLK_TCK)
# shellcheck source=bench/common.sh
source bench/common.sh
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pss() { awk '$1 == "Pss:" {print $2}' "/proc/$1/smaps_rollup"; }
"$T/mock-upstream" --port 0 --http2 >"$OUT/mock-a.log" 2>&1 &
"$T/mock-upstream" --port 0 --http2 >"$OUT/mock-b.log" 2>&1 &
A=$(addr "$OUT/mock-a.log"); B=$(addr "$OUT/mock-b.log")
NOFILE=$(ulimit -n)
proxy() { # TARGET NAME: starts a fresh proxy (hyper-h1, hyper-h2, ccgate-h1, ccgate-h2); sets PID and URL
    local h2=false; [[ $1 == *-h2 ]] && h2=true
    case $1 in
        hyper-*)
            local flag=(); $h2 && flag=(--http2)
            "$T/bare-proxy" --port 0 --upstream "$A" --upstream "$B" "${flag[@]}" >"$OUT/$2.log" 2>&1 &
            ;;
        ccgate-*)
            mkdir -p "$OUT/$2"
            printf '[server]\nlisten = "127.0.0.1:0"\nmax_connections = %s\n' $((NOFILE - 512)) >"$OUT/$2/ccgate.toml"
            for u in "$A" "$B"; do
                printf '\n[[endpoints]]\nname = "mock-%s"\nbase_url = "http://%s"\napi_key = "bench"\nhttp2 = %s\n' \
                    "${u##*:}" "$u" "$h2" >>"$OUT/$2/ccgate.toml"
            done
            chmod 600 "$OUT/$2/ccgate.toml"
            XDG_DATA_HOME=$OUT/$2 XDG_STATE_HOME=$OUT/$2 RUST_LOG=warn \
                "$CCGATE" serve --config "$OUT/$2/ccgate.toml" >"$OUT/$2.log" 2>&1 &
            ;;
        *) echo "unknown target $1" >&2; exit 1 ;;
    esac
    PID=$!; URL=http://$(addr "$OUT/$2.log")/v1/messages
}
printf 'rep\tproto\tworkload\tn\tvalue\tunit\n' >"$OUT/runs.tsv"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" | tee -a "$OUT/runs.tsv"; }
read -r -a order <<<"$TARGETS"
for rep in $(seq "$REPEATS"); do
    # Rotate the order every repeat, so that machine noise hits all alike.
    protos=("${order[@]:rep % ${#order[@]}}" "${order[@]:0:rep % ${#order[@]}}")
    for proto in "${protos[@]}"; do
        for n in $STREAMS; do
            per=2; [[ $proto == *-h2 ]] && per=1
            if ((per * n + 512 > NOFILE)); then
                echo "skip: $proto at $n streams needs $((per * n + 512)) descriptors (limit $NOFILE)" >&2
                continue
            fi
            proxy "$proto" "slow-$rep-$proto-$n"
            idle=$(pss "$PID"); peak=$idle
            "$T/sse-load" --url "$URL" -c "$n" --streams "$n" --body "$SBODY" \
                -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 200' --expect-events 26 \
                --connect-timeout 30 --ramp "$(awk -v n="$n" 'BEGIN {printf "%.1f", n / 5000}')" \
                >"$OUT/slow-$rep-$proto-$n.json" 2>/dev/null &
            load=$!
            while kill -0 "$load" 2>/dev/null; do
                cur=$(pss "$PID"); ((cur > peak)) && peak=$cur; sleep 0.05
            done
            wait "$load" || true
            done_n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["completed"])' "$OUT/slow-$rep-$proto-$n.json")
            row "$rep" "$proto" slow "$n" "$peak" "kB peak PSS ($done_n/$n completed, idle $idle kB)"
            kill "$PID"; wait "$PID" 2>/dev/null || true
        done
        proxy "$proto" "sse-$rep-$proto"
        c0=$(ticks "$PID")
        "$T/sse-load" --url "$URL" -c 64 -d "$DURATION" --body "$SBODY" \
            -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 5' >"$OUT/sse-$rep-$proto.json" 2>/dev/null
        c1=$(ticks "$PID")
        done_n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["completed"])' "$OUT/sse-$rep-$proto.json")
        row "$rep" "$proto" sse_c64 64 "$(awk -v t=$((c1 - c0)) -v k="$CLK_TCK" -v n="$done_n" 'BEGIN {printf "%.1f", t / k / n * 1e6}')" "µs CPU per stream ($done_n streams)"
        kill "$PID"; wait "$PID" 2>/dev/null || true
        proxy "$proto" "ns-$rep-$proto"
        oha -z 1s -c 64 -m POST -D "$BODY" -H 'content-type: application/json' --no-tui "$URL" >/dev/null 2>&1 || true
        c0=$(ticks "$PID")
        oha -z "${DURATION}s" -c 64 -m POST -D "$BODY" -H 'content-type: application/json' \
            --no-tui --output-format json "$URL" >"$OUT/ns-$rep-$proto.json" 2>/dev/null
        c1=$(ticks "$PID")
        read -r rps ok < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["summary"]["requestsPerSec"], sum(v for k,v in d["statusCodeDistribution"].items() if k=="200"))' "$OUT/ns-$rep-$proto.json")
        row "$rep" "$proto" ns_c64 64 "$rps" "requests/s"
        row "$rep" "$proto" ns_cpu 64 "$(awk -v t=$((c1 - c0)) -v k="$CLK_TCK" -v n="$ok" 'BEGIN {printf "%.2f", t / k / n * 1e6}')" "µs CPU per request ($ok requests)"
        kill "$PID"; wait "$PID" 2>/dev/null || true
    done
done
python3 - "$OUT/runs.tsv" "$STREAMS" "$TARGETS" <<'EOF'
import csv, math, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
counts = [int(n) for n in sys.argv[2].split()]
targets = sys.argv[3].split()
def med(t, wl, n=None):
    v = [float(r["value"]) for r in rows if r["proto"] == t and r["workload"] == wl and (n is None or int(r["n"]) == n)]
    return statistics.median(v) if v else float("nan")
def slope(t):
    have = [n for n in counts if not math.isnan(med(t, "slow", n))]
    if len(have) < 2:
        return float("nan"), ""
    lo, hi = min(have), max(have)
    return (med(t, "slow", hi) - med(t, "slow", lo)) / (hi - lo), f"{lo}->{hi}"
print(f"\nmedians over {len(set(r['rep'] for r in rows))} repeats (HTTP/1.1 vs HTTP/2 to the upstreams)")
print(f"{'':34}" + "".join(f"{t:>12}" for t in targets))
for n in counts:
    print(f"{f'peak PSS at {n} streams (MB)':34}" + "".join(f"{med(t, 'slow', n)/1024:12.1f}" for t in targets))
print(f"{'PSS slope (KB/stream)':34}" + "".join(f"{slope(t)[0]:12.1f}" for t in targets))
print(f"{'  between':34}" + "".join(f"{slope(t)[1]:>12}" for t in targets))
for wl, label in (("sse_c64", "CPU per stream, c=64 (µs)"), ("ns_cpu", "CPU per request, c=64 (µs)"), ("ns_c64", "throughput, c=64 (req/s)")):
    print(f"{label:34}" + "".join(f"{med(t, wl):12.1f}" for t in targets))
EOF
echo "raw: $OUT/runs.tsv"
