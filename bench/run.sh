#!/usr/bin/env bash
# Side-by-side benchmark of ccgate against nginx, a bare hyper proxy and a direct connection
# (issues #6 and #22).
#
# Run from anywhere:
#
#     bench/run.sh                          # full run: DURATION=10 REPEATS=3, 3 bodies, 1k + 10k streams
#     DURATION=5 REPEATS=2 bench/run.sh     # quicker
#     BODIES=2k SLOW_STREAMS=1000 bench/run.sh   # one body size, one slow-stream count
#
# What it does, all on loopback:
#   1. installs what is missing: `oha` (cargo install oha --locked), nginx (apt-get install -y nginx);
#   2. builds ccgate (scripts/pgo.sh: a release build optimised with a profile of its request path;
#      PGO=0 for plain `cargo build --release`) and the bench crate
#      bench/mock-upstream (binaries `mock-upstream`, `sse-load` and `bare-proxy`);
#   3. raises the open-file limit as far as the hard limit allows (10k slow streams need two
#      descriptors per stream in a proxy, one in the client and one in a mock), starts two mocks,
#      nginx over both (keep-alive to the upstreams, no buffering, next-upstream on errors) and
#      ccgate over both (equal priority);
#      It also starts `bare-proxy` (bench/mock-upstream) over both: the leanest reverse proxy
#      hyper and tokio allow, with ccgate's threading but none of its features — the "hyper"
#      target, a yardstick that separates the stack's cost from ccgate's own;
#   4. warms every target up once with every body, then alternates targets (direct = straight to
#      mock A / nginx / hyper / ccgate, order rotated every repeat so machine noise hits all
#      alike), REPEATS times (hyper: all but failover); per repeat, for each body of BODIES:
#        ns_c1      non-streaming POST /v1/messages with that body, concurrency 1          (oha)
#        ns_c64     the same at concurrency 64                                             (oha)
#        sse_c64    streaming, 20 events 5 ms apart, concurrency 64                       (sse-load)
#      then, with the 2k body:
#        slow       for each count N of SLOW_STREAMS, on fresh gateways: idle RSS/PSS after
#                   startup, then N concurrent streams of 20 events 200 ms apart (their connects
#                   spread over SLOW_RAMP_S), peak RSS/PSS while streaming                (sse-load)
#                   A fifth target joins these rounds, *ccgate-h2*: ccgate with `http2 = true` on
#                   both endpoints, over two more mocks that also speak h2c. Its streams share a
#                   few upstream connections, so it needs one descriptor per stream where an
#                   HTTP/1.1 proxy needs two: a round too big for the open-file limit over
#                   HTTP/1.1 (10000 streams under a hard limit of 20000) still runs for nginx
#                   (one limit per worker process) and ccgate-h2
#        failover   fresh gateways over a healthy mock and a broken one — answering 500,
#                   refusing connections, or killed a third into the run                  (oha)
#   5. writes medians, ratios, the targets of issue #22 and the machine to BENCHMARKS.md
#      (bench/report.py) and raw results to bench/results/<timestamp>/ (bench/results/latest
#      points at the newest).
#
# Knobs (environment):
#   DURATION=10            seconds per timed run (ns_c1, ns_c64, sse_c64, failover)
#   REPEATS=3              repeats of the whole alternating matrix; medians are taken over them
#   WARMUP=1               seconds of warm-up load per target and body before the first repeat
#                          (0: none)
#   BODIES="2k 100k 1m"    request body sizes of the timed workloads, from bench/payloads.py (Claude
#                          Code's shape: system blocks with cache_control, tool schemas, tool_use /
#                          tool_result history, metadata.user_id last). BODY=x is a synonym for
#                          BODIES=x (one size). slow and failover always use the 2k body.
#   SLOW_STREAMS="1000 10000"  concurrent stream counts of the slow workload, one round each
#                          (SLOW_EVENTS x SLOW_PACE_MS per stream); the report takes each
#                          gateway's memory slope per stream between the smallest and the largest
#                          count it ran
#   SLOW_EVENTS=20  SLOW_PACE_MS=200
#   SLOW_H2=1              run the ccgate-h2 target in the slow rounds (0: leave it out)
#   SLOW_RAMP_S=auto       seconds over which sse-load spreads a slow round's connects (auto:
#                          N/5000, i.e. 0.2 s for 1000 streams, 2 s for 10000), so that thousands
#                          of simultaneous connects do not overrun the listen backlogs; keep it
#                          well under the stream's length (SLOW_EVENTS x SLOW_PACE_MS = 4 s)
#   STREAM_EVENTS=20  STREAM_PACE_MS=5
#   STREAM_RAMP_S=0        seconds over which sse_c64's 64 workers spread their first streams
#                          (sse-load --ramp). 0 starts all at once, so the streams run in waves
#                          of 64 that arrive, and get their first content, together; a ramp as
#                          long as one stream (e.g. 0.1) spreads them over time instead
#   FAILOVER_CONCURRENCY=16
#   WORKLOADS="ns_c1 ns_c64 sse_c64 slow failover"   subset to run
#   PGO=1                  build ccgate with profile-guided optimisation (scripts/pgo.sh: a
#                          training run over the mocks, then the optimised build), as a release
#                          would ship it; PGO=0: plain `cargo build --release`
#   CCGATE_BIN=path        use this ccgate binary, build nothing
#   CCGATE_REF=HEAD        build ccgate from this git ref (git archive into BUILD_DIR) instead of
#                          the working tree, e.g. while the working tree does not compile
#   BUILD_DIR=/tmp/ccgate-bench-build   where CCGATE_REF builds go
#   CCGATE_RUST_LOG=warn   RUST_LOG for ccgate. `warn` turns its per-request info line off, as nginx
#                          runs with access_log off; set `info` to measure with request logging
#   PROFILE=1              perf-record ccgate (cpu-clock) during the first repeat's ns_c64 and
#                          sse_c64 runs, per body; reports land in the results dir as
#                          perf-<workload>-<body>.txt. Sampling slows ccgate a little in those runs:
#                          leave it off for the numbers you publish.
#   OUT=BENCHMARKS.md      report path (relative to the repo root)
#
# Connection budgets: nginx's worker_connections and ccgate's server.max_connections are 4096 for
# the timed workloads and 2 x N + 1024 in a slow round of N streams (nginx preallocates its
# connection table, so each slow round's nginx is sized for that round, as one would deploy it).
#
# The load generator, the proxies and the mocks share the machine's cores: nothing is pinned.
# Every process this script starts is stopped on exit (trap).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
# shellcheck source=bench/nginx.sh
source "$BENCH/nginx.sh"
# shellcheck source=bench/common.sh
source "$BENCH/common.sh"
COMMAND_LINE="$(for v in BODIES BODY DURATION REPEATS WARMUP SLOW_STREAMS SLOW_EVENTS SLOW_PACE_MS \
    SLOW_H2 SLOW_RAMP_S STREAM_EVENTS STREAM_PACE_MS STREAM_RAMP_S FAILOVER_CONCURRENCY WORKLOADS CCGATE_BIN CCGATE_REF \
    CCGATE_RUST_LOG PROFILE OUT; do
    if [[ -z "${!v:-}" ]]; then continue; fi
    if [[ ${!v} =~ ^[A-Za-z0-9_./:@%+,\ -]*$ && ${!v} == *" "* ]]; then printf '%s="%s" ' "$v" "${!v}"
    else printf '%s=%q ' "$v" "${!v}"; fi; done)bench/run.sh"

DURATION=${DURATION:-10}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
# BODY=x (one size) is the older spelling of BODIES=x.
BODIES=${BODIES:-${BODY:-2k 100k 1m}}
SLOW_STREAMS_GIVEN=${SLOW_STREAMS:+1}
SLOW_STREAMS=${SLOW_STREAMS:-1000 10000}
SLOW_RAMP_S=${SLOW_RAMP_S:-auto}
SLOW_H2=${SLOW_H2:-1}
SLOW_EVENTS=${SLOW_EVENTS:-20}
SLOW_PACE_MS=${SLOW_PACE_MS:-200}
STREAM_EVENTS=${STREAM_EVENTS:-20}
STREAM_PACE_MS=${STREAM_PACE_MS:-5}
STREAM_RAMP_S=${STREAM_RAMP_S:-0}
FAILOVER_CONCURRENCY=${FAILOVER_CONCURRENCY:-16}
WORKLOADS=${WORKLOADS:-"ns_c1 ns_c64 sse_c64 slow failover"}
BUILD_DIR=${BUILD_DIR:-${TMPDIR:-/tmp}/ccgate-bench-build}
PROFILE=${PROFILE:-0}
PGO=${PGO:-1}
OUT=${OUT:-BENCHMARKS.md}
[[ $OUT == /* ]] || OUT=$ROOT/$OUT
CCGATE_RUST_LOG=${CCGATE_RUST_LOG:-warn}

# The lists, checked and normalised before anything starts.
read -r -a BODY_LIST <<<"$BODIES"
((${#BODY_LIST[@]})) || { echo "BODIES is empty" >&2; exit 1; }
for b in "${BODY_LIST[@]}"; do
    [[ $b == 2k || $b == 100k || $b == 1m ]] || { echo "BODIES: '$b' is not one of 2k, 100k, 1m" >&2; exit 1; }
done
read -r -a SLOW_LIST <<<"$(tr ' ' '\n' <<<"$SLOW_STREAMS" | sed '/^$/d' | sort -n -u | tr '\n' ' ')"
for n in "${SLOW_LIST[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "SLOW_STREAMS: '$n' is not a positive number" >&2; exit 1; }
done
((${#SLOW_LIST[@]})) || { echo "SLOW_STREAMS is empty" >&2; exit 1; }
SLOW_MAX=${SLOW_LIST[-1]}
# The counts as asked for: raise_nofile may shrink SLOW_LIST (the HTTP/1.1 rounds) to what fits,
# while ccgate-h2 and nginx still run the counts that fit them (H2_LIST).
SLOW_ASKED=("${SLOW_LIST[@]}")
H2_LIST=()
[[ $SLOW_RAMP_S == auto || $SLOW_RAMP_S =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    { echo "SLOW_RAMP_S must be auto or a number of seconds" >&2; exit 1; }
[[ $STREAM_RAMP_S =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "STREAM_RAMP_S must be a number of seconds" >&2; exit 1; }

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$BENCH/results/$STAMP
RAW=$RESULTS/raw
LOGS=$RESULTS/logs
mkdir -p "$RAW" "$LOGS"
ln -sfn "$STAMP" "$BENCH/results/latest"
RUNS=$RESULTS/runs.jsonl
: >"$RUNS"

export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------------------------------
# Process bookkeeping: every background process goes into PIDS; the trap stops them all.
# ------------------------------------------------------------------------------------------------
PIDS=()
LAST_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... : runs CMD in the background, output to $LOGS/NAME.log; sets LAST_PID.
start() {
    local name=$1; shift
    "$@" >"$LOGS/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop PID : TERM, wait up to 5 s, then KILL; forgets the pid.
stop() {
    local p=$1 q keep=()
    if kill -TERM "$p" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
    for q in "${PIDS[@]}"; do [[ $q == "$p" ]] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}

# div A B : A / B with three decimals (awk, so no bc is needed).
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b == 0 ? 0 : a / b) }'; }

# conn_budget N : nginx worker_connections / ccgate max_connections for N concurrent streams
# (2 connections per stream in a proxy, per worker in the worst case), at least 4096.
conn_budget() { local n=$((2 * $1 + 1024)); ((n > 4096)) || n=4096; echo "$n"; }

# slow_ramp N : seconds over which a slow round of N streams spreads its connects.
slow_ramp() {
    if [[ $SLOW_RAMP_S == auto ]]; then awk -v n="$1" 'BEGIN { printf "%.3f", n / 5000 }'; else echo "$SLOW_RAMP_S"; fi
}

# raise_nofile : the open-file limit as high as the hard limit allows (raising the hard limit
# needs CAP_SYS_RESOURCE); warns when it is short of what SLOW_MAX streams need.
raise_nofile() {
    local want=$((2 * SLOW_MAX + 512)) hard
    ((want > 65536)) || want=65536
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < want)); then
        ulimit -Hn "$want" 2>/dev/null || true
        hard=$(ulimit -Hn)
    fi
    if [[ $hard == unlimited ]]; then
        ulimit -n "$want" 2>/dev/null || ulimit -n 1048576 2>/dev/null || true
    else
        ulimit -n "$hard" 2>/dev/null || true
    fi
    NOFILE=$(ulimit -n)
    [[ $NOFILE == unlimited ]] && NOFILE=1048576
    log "open-file limit: $NOFILE (hard: $(ulimit -Hn))"
    # The default big round shrinks to what one proxy process can hold (2 descriptors per stream
    # plus its own) when the hard limit cannot be raised; an explicit SLOW_STREAMS is kept as is.
    if [[ -z $SLOW_STREAMS_GIVEN ]] && ((NOFILE < 2 * SLOW_MAX + 512)); then
        local fit=$(((NOFILE - 512) / 2000 * 1000)) counts=() n
        for n in "${SLOW_LIST[@]}"; do ((n > fit)) && n=$fit; counts+=("$n"); done
        read -r -a SLOW_LIST <<<"$(printf '%s\n' "${counts[@]}" | sort -n -u | tr '\n' ' ')"
        SLOW_STREAMS="${SLOW_LIST[*]}"
        log "the open-file hard limit ($NOFILE) fits $fit streams in one proxy process, not $SLOW_MAX:" \
            "slow rounds: $SLOW_STREAMS"
        SLOW_MAX=$fit
    fi
    # ccgate-h2 holds one descriptor per stream (the client's) plus its own: it runs every count
    # asked for that fits.
    H2_LIST=()
    if ((SLOW_H2)); then
        for n in "${SLOW_ASKED[@]}"; do ((n + 512 <= NOFILE)) && H2_LIST+=("$n"); done
        log "slow rounds with ccgate-h2: ${H2_LIST[*]:-none}"
    fi
    # Each process has its own limit: the load generator and the mock hold one descriptor per
    # stream, a proxy two (client and upstream side) plus its own.
    if has slow && ((NOFILE < 2 * SLOW_MAX + 512)); then
        log "warning: a proxy holds 2 descriptors per stream (client + upstream): a single-process" \
            "gateway (ccgate, hyper) cannot hold $SLOW_MAX streams at once under $NOFILE open files;" \
            "expect failed or delayed streams in that round (raise the hard limit: ulimit -Hn, limits.conf)"
    fi
}

# wait_listening NAME PID : waits for "listening on http://ADDR" in NAME's log, prints ADDR.
wait_listening() {
    local name=$1 pid=$2 addr
    for _ in $(seq 300); do
        addr=$(sed -n 's|^.*listening on http://\([0-9.:]*\).*$|\1|p' "$LOGS/$name.log" | head -n1)
        if [[ -n "$addr" ]]; then echo "$addr"; return 0; fi
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOGS/$name.log" >&2; die "$name exited"; }
        sleep 0.05
    done
    tail -n 20 "$LOGS/$name.log" >&2
    die "$name did not print its address"
}

# wait_http URL : waits until URL answers at all.
wait_http() {
    for _ in $(seq 200); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.05
    done
    die "$1 does not answer"
}

# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------
install_tools() {
    command -v python3 >/dev/null || die "python3 is needed for the report"
    command -v curl >/dev/null || die "curl is needed"
    if ! command -v oha >/dev/null; then
        log "installing oha (cargo install oha --locked)"
        cargo install oha --locked
    fi
    if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
        log "installing nginx (apt-get install -y nginx)"
        local sudo=; [[ $(id -u) -eq 0 ]] || sudo=sudo
        $sudo apt-get install -y nginx || { $sudo apt-get update && $sudo apt-get install -y nginx; }
    fi
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

build() {
    if [[ -n "${CCGATE_BIN:-}" ]]; then
        CCGATE=$CCGATE_BIN
        CCGATE_VERSION="$CCGATE_BIN ($("$CCGATE_BIN" --version 2>/dev/null || echo '?'))"
    elif [[ -n "${CCGATE_REF:-}" ]]; then
        log "building ccgate from git ref $CCGATE_REF in $BUILD_DIR"
        rm -rf "$BUILD_DIR/src" && mkdir -p "$BUILD_DIR/src"
        git -C "$ROOT" archive "$CCGATE_REF" | tar -x -C "$BUILD_DIR/src"
        if ((PGO)) && [[ -x $BUILD_DIR/src/scripts/pgo.sh ]]; then
            (cd "$BUILD_DIR/src" && env -u CARGO_TARGET_DIR scripts/pgo.sh)
            CCGATE=$BUILD_DIR/src/target/pgo/ccgate
        else
            (cd "$BUILD_DIR/src" && CARGO_TARGET_DIR=$BUILD_DIR/target cargo build --release --bin ccgate)
            CCGATE=$BUILD_DIR/target/release/ccgate
        fi
        CCGATE_VERSION="$(git -C "$ROOT" rev-parse --short "$CCGATE_REF") ($CCGATE_REF)"
    elif ((PGO)); then
        log "building ccgate with profile-guided optimisation (scripts/pgo.sh)"
        (cd "$ROOT" && scripts/pgo.sh) ||
            die "ccgate does not build; CCGATE_REF=HEAD bench/run.sh benchmarks the last commit instead"
        CCGATE=$ROOT/target/pgo/ccgate
        CCGATE_VERSION="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml || echo '+dirty')"
    else
        log "building ccgate (cargo build --release)"
        (cd "$ROOT" && cargo build --release) ||
            die "ccgate does not build; CCGATE_REF=HEAD bench/run.sh benchmarks the last commit instead"
        CCGATE=${CARGO_TARGET_DIR:-$ROOT/target}/release/ccgate
        CCGATE_VERSION="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml || echo '+dirty')"
    fi
    if [[ -z "${CCGATE_BIN:-}" ]] && ((PGO)); then
        CCGATE_VERSION+=", PGO build"
    fi
    [[ -x "$CCGATE" ]] || die "no ccgate binary at $CCGATE"
    # Run a private copy: another build may replace target/release/ccgate while we measure.
    mkdir -p "$RESULTS/bin"
    cp "$CCGATE" "$RESULTS/bin/ccgate"
    CCGATE=$RESULTS/bin/ccgate
    CCGATE_VERSION=${CCGATE_VERSION:-$CCGATE}
    # server.max_connections came with aa122f0; older builds reject the unknown key.
    CCGATE_HAS_MAX_CONNECTIONS=0
    if grep -q -a 'server.max_connections' "$CCGATE"; then CCGATE_HAS_MAX_CONNECTIONS=1; fi
    log "building bench/mock-upstream"
    cargo build --release --manifest-path "$BENCH/mock-upstream/Cargo.toml"
    local tdir=${CARGO_TARGET_DIR:-$BENCH/mock-upstream/target}
    MOCK=$tdir/release/mock-upstream
    SSE_LOAD=$tdir/release/sse-load
    BARE=$tdir/release/bare-proxy
}

# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------

# start_mock NAME [ARGS...] : sets MOCK_PID, MOCK_ADDR.
start_mock() {
    local name=$1; shift
    start "$name" "$MOCK" --port 0 --events "$STREAM_EVENTS" --pace-ms "$STREAM_PACE_MS" "$@"
    MOCK_PID=$LAST_PID
    MOCK_ADDR=$(wait_listening "$name" "$MOCK_PID")
}

# start_nginx NAME UPSTREAM_ADDR... : sets NGINX_PID (the master), NGINX_ADDR.
# NGINX_CONNS (environment, default 4096): worker_connections.
start_nginx() {
    local name=$1; shift
    local conns=${NGINX_CONNS:-4096} nofile=${NOFILE:-$(ulimit -n)}
    local dir=$RESULTS/$name port
    port=$(free_port)
    write_nginx_conf "$dir" "$port" "$conns" "$nofile" "$@"
    start "$name" "$NGINX" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf"
    NGINX_PID=$LAST_PID
    NGINX_ADDR=127.0.0.1:$port
    wait_http "http://$NGINX_ADDR/"
}

# start_ccgate NAME UPSTREAM_ADDR... : sets CCGATE_PID, CCGATE_ADDR.
# CCGATE_CONNS (environment, default 4096): server.max_connections, if this ccgate knows it.
# CCGATE_H2=1 (environment): `http2 = true` on every endpoint (h2c to mocks started with --http2).
start_ccgate() {
    local name=$1; shift
    local dir=$RESULTS/$name i=0 a
    mkdir -p "$dir/xdg"
    {
        printf '# Generated by bench/run.sh\n[server]\nlisten = "127.0.0.1:0"\nstrategy = "priority"\n'
        if [[ $CCGATE_HAS_MAX_CONNECTIONS == 1 ]]; then
            printf 'max_connections = %s\n' "${CCGATE_CONNS:-4096}"
        fi
        printf '\n'
        for a in "$@"; do
            i=$((i + 1))
            printf '[[endpoints]]\nname = "mock-%s"\nbase_url = "http://%s"\napi_key = "bench"\npriority = 1\nweight = 100\n' "$i" "$a"
            if [[ ${CCGATE_H2:-0} == 1 ]]; then printf 'http2 = true\n'; fi
            printf '\n'
        done
    } >"$dir/ccgate.toml"
    chmod 600 "$dir/ccgate.toml"
    start "$name" env XDG_DATA_HOME="$dir/xdg" XDG_STATE_HOME="$dir/xdg" XDG_CACHE_HOME="$dir/xdg" \
        ${CCGATE_RUST_LOG:+RUST_LOG="$CCGATE_RUST_LOG"} \
        "$CCGATE" serve --config "$dir/ccgate.toml"
    CCGATE_PID=$LAST_PID
    CCGATE_ADDR=$(wait_listening "$name" "$CCGATE_PID")
    # `env` execs ccgate, so the pid is ccgate's own.
}

# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

# pids_of TARGET : the gateway's processes (nginx: master + workers).
pids_of() {
    case $1 in
        nginx) echo "$G_NGINX_PID" $(pgrep -P "$G_NGINX_PID" || true) ;;
        ccgate) echo "$G_CCGATE_PID" ;;
        hyper) echo "$G_HYPER_PID" ;;
        direct) echo ;;
    esac
}

# cpu_ticks PID... : summed utime+stime in clock ticks (USER_ONLY=1: utime only).
cpu_ticks() {
    local sum=0 p t
    for p in "$@"; do
        t=$(awk -v u="${USER_ONLY:-0}" '{print (u == 1) ? $14 : $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        sum=$((sum + t))
    done
    echo "$sum"
}

# rss_kb FIELD PID... : summed VmRSS / VmHWM in kB.
rss_kb() {
    local field=$1 sum=0 p v; shift
    for p in "$@"; do
        v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || true)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

# pss_kb PID... : summed proportional set size (shared pages split between the processes), kB.
pss_kb() {
    local sum=0 p v
    for p in "$@"; do
        v=$(awk '$1 == "Pss:" {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

# rss_sampler OUTFILE PID... : runs until killed; keeps "peak-VmRSS-sum peak-Pss-sum" (kB) in OUTFILE.
rss_sampler() {
    local out=$1 max=0 maxp=0 cur curp; shift
    echo "0 0" >"$out"
    while :; do
        cur=$(rss_kb VmRSS "$@"); curp=$(pss_kb "$@")
        if ((cur > max || curp > maxp)); then
            ((cur > max)) && max=$cur
            ((curp > maxp)) && maxp=$curp
            # Written whole, then renamed: the sampler is killed at any moment, and a reader
            # must never find the file truncated and empty.
            echo "$max $maxp" >"$out.tmp" && mv -f "$out.tmp" "$out"
        fi
        sleep 0.05
    done
}

CLK_TCK=$(getconf CLK_TCK)
NS_HEADERS=(-H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' -H 'x-api-key: sk-bench-client')

url_of() {
    case $1 in
        direct) echo "http://$G_DIRECT_ADDR/v1/messages" ;;
        nginx) echo "http://$G_NGINX_ADDR/v1/messages" ;;
        ccgate) echo "http://$G_CCGATE_ADDR/v1/messages" ;;
        hyper) echo "http://$G_HYPER_ADDR/v1/messages" ;;
    esac
}

# record KEY=VALUE... : appends one JSON line to runs.jsonl (values are numbers or quoted strings).
record() {
    local line= kv
    for kv in "$@"; do line+="${line:+,}\"${kv%%=*}\":${kv#*=}"; done
    echo "{$line}" >>"$RUNS"
}

# measure REPEAT WORKLOAD TARGET TOOL CMD... : runs CMD (stdout → raw file) on the main servers,
# with CPU accounting of gateway and mocks; the body is CUR_BODY's (BODY_FILE / STREAM_BODY_FILE).
measure() {
    local rep=$1 wl=$2 target=$3 tool=$4; shift 4
    local name="r$rep-$wl-$CUR_BODY-$target"
    local raw="$RAW/$name.json" gw_pids mocks="$G_MOCK_A_PID $G_MOCK_B_PID"
    gw_pids=$(pids_of "$target")
    local g0 m0 g1 m1 u0 u1 t0 t1 perf_pid=
    g0=$(cpu_ticks $gw_pids); u0=$(USER_ONLY=1 cpu_ticks $gw_pids); m0=$(cpu_ticks $mocks); t0=$(date +%s.%N)
    local pname="perf-$wl-$CUR_BODY"
    if [[ $PROFILE == 1 && $target == ccgate && $rep == 1 ]] && [[ $wl == ns_c64 || $wl == sse_c64 ]]; then
        perf record -e cpu-clock -F 999 -g -p "$G_CCGATE_PID" -o "$RESULTS/$pname.data" \
            >"$LOGS/$pname.log" 2>&1 &
        perf_pid=$!
        PIDS+=("$perf_pid")
    fi
    "$@" >"$raw" 2>"$LOGS/$name.err" || log "warning: $wl/$CUR_BODY/$target exited non-zero (see logs)"
    t1=$(date +%s.%N)
    g1=$(cpu_ticks $gw_pids); u1=$(USER_ONLY=1 cpu_ticks $gw_pids); m1=$(cpu_ticks $mocks)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        stop "$perf_pid"
        {
            echo "## ccgate CPU by object (self time)"
            perf report -i "$RESULTS/$pname.data" --stdio --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-160 || true
            echo; echo "## hottest symbols (self time)"
            perf report -i "$RESULTS/$pname.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-160 || true
            echo; echo "## inclusive time (children), symbols above 2%"
            perf report -i "$RESULTS/$pname.data" --stdio --children --sort symbol -g none --percent-limit 2 2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-160 || true
        } >"$RESULTS/$pname.txt"
    fi
    record rep="$rep" workload="\"$wl\"" body="\"$CUR_BODY\"" target="\"$target\"" tool="\"$tool\"" \
        raw="\"${raw#"$RESULTS"/}\"" wall_s="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" \
        gw_cpu_s="$(div $((g1 - g0)) "$CLK_TCK")" gw_user_s="$(div $((u1 - u0)) "$CLK_TCK")" mocks_cpu_s="$(div $((m1 - m0)) "$CLK_TCK")"
}

oha_run() { # CONCURRENCY URL [extra oha args]
    local c=$1 url=$2; shift 2
    oha -z "${DURATION}s" -c "$c" -m POST -D "$BODY_FILE" "${NS_HEADERS[@]}" \
        --no-tui --output-format json "$@" "$url"
}

sse_run() { # CONCURRENCY URL [extra sse-load args]
    local c=$1 url=$2; shift 2
    "$SSE_LOAD" --url "$url" -c "$c" --body "$STREAM_BODY_FILE" \
        -H "x-mock-events: $STREAM_EVENTS" -H "x-mock-pace-ms: $STREAM_PACE_MS" \
        --expect-events $((STREAM_EVENTS + 6)) --ramp "$STREAM_RAMP_S" "$@"
}

# rotated REPEAT : the four targets, rotated by REPEAT.
rotated() {
    local t=(direct nginx hyper ccgate) i
    for i in 0 1 2 3; do printf '%s ' "${t[$(((i + $1) % 4))]}"; done
}

has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

# --- slow streams: fresh gateways, idle RSS, then N concurrent slow streams ---------------------
# in_list N LIST... : whether N is one of LIST.
in_list() { local n=$1 x; shift; for x in "$@"; do [[ $x == "$n" ]] && return 0; done; return 1; }

# slow_round REPEAT N : one round of N streams per target, on gateways started for it (nginx's
# worker_connections and ccgate's max_connections sized for N), always with the 2k stream body.
# The four targets run when N is in SLOW_LIST; ccgate-h2 when N is in H2_LIST; a count in H2_LIST
# alone (too big for an HTTP/1.1 proxy under the open-file limit) runs nginx and ccgate-h2.
slow_round() {
    local rep=$1 n=$2 target tag="r$1-$2"
    local budget ramp targets=() h1=0 h2=0
    budget=$(conn_budget "$n"); ramp=$(slow_ramp "$n")
    in_list "$n" "${SLOW_LIST[@]}" && h1=1
    ((${#H2_LIST[@]})) && in_list "$n" "${H2_LIST[@]}" && h2=1
    if ((h1)); then read -r -a targets <<<"$(rotated "$rep")"; else targets=(nginx); fi
    ((h2)) && targets+=(ccgate-h2)
    # Per gateway: its main pid, its address, and (once started) every pid to sum memory over.
    local -A pid=() addr=() pids=() idle=() idle_pss=()
    NGINX_CONNS=$budget start_nginx "slow-nginx-$tag" "$G_MOCK_A_ADDR" "$G_MOCK_B_ADDR"
    pid[nginx]=$NGINX_PID addr[nginx]=$NGINX_ADDR
    if ((h1)); then
        CCGATE_CONNS=$budget start_ccgate "slow-ccgate-$tag" "$G_MOCK_A_ADDR" "$G_MOCK_B_ADDR"
        pid[ccgate]=$CCGATE_PID addr[ccgate]=$CCGATE_ADDR
        start "slow-hyper-$tag" "$BARE" --port 0 --upstream "$G_MOCK_A_ADDR" --upstream "$G_MOCK_B_ADDR"
        pid[hyper]=$LAST_PID
        addr[hyper]=$(wait_listening "slow-hyper-$tag" "$LAST_PID")
    fi
    if ((h2)); then
        local conns=$budget
        ((conns <= NOFILE - 512)) || conns=$((NOFILE - 512))
        CCGATE_H2=1 CCGATE_CONNS=$conns start_ccgate "slow-ccgate-h2-$tag" "$G_H2_MOCK_A_ADDR" "$G_H2_MOCK_B_ADDR"
        pid[ccgate-h2]=$CCGATE_PID addr[ccgate-h2]=$CCGATE_ADDR
    fi
    # Idle RSS once startup has settled: sample every 0.2 s until two samples in a row agree
    # (nginx's worker set and every gateway's RSS), at most 10 s.
    local g sample prev= i
    for ((i = 0; i < 50; i++)); do
        sample=
        for g in "${!pid[@]}"; do
            pids[$g]=${pid[$g]}
            if [[ $g == nginx ]]; then pids[$g]+=" $(pgrep -P "${pid[$g]}" | tr '\n' ' ' || true)"; fi
            sample+="$g:${pids[$g]}:$(rss_kb VmRSS ${pids[$g]})/"
        done
        [[ $sample == "$prev" ]] && break
        prev=$sample
        sleep 0.2
    done
    ((i < 50)) || log "warning: idle RSS still moving after 10 s; recording the last sample"
    for g in "${!pid[@]}"; do
        idle[$g]=$(rss_kb VmRSS ${pids[$g]}); idle_pss[$g]=$(pss_kb ${pids[$g]})
    done
    for target in "${targets[@]}"; do
        local url gw_pids= idle_kb=0 idle_pss_kb=0
        case $target in
            direct) url="http://$G_MOCK_A_ADDR/v1/messages" ;;
            nginx | ccgate | hyper | ccgate-h2)
                url="http://${addr[$target]}/v1/messages"
                gw_pids=${pids[$target]} idle_kb=${idle[$target]} idle_pss_kb=${idle_pss[$target]} ;;
            *) die "slow_round: unknown target $target" ;;
        esac
        log "  slow/$n/$target: $n streams of $SLOW_EVENTS events ${SLOW_PACE_MS} ms apart (connects over ${ramp} s)"
        local peak_file=$RESULTS/peak-$tag-$target sampler=
        if [[ -n $gw_pids ]]; then
            rss_sampler "$peak_file" $gw_pids &
            sampler=$!
            PIDS+=("$sampler")
        fi
        local raw="$RAW/$tag-slow-$target.json" t0 t1
        t0=$(date +%s.%N)
        "$SSE_LOAD" --url "$url" -c "$n" --streams "$n" --body "$SLOW_BODY_FILE" \
            -H "x-mock-events: $SLOW_EVENTS" -H "x-mock-pace-ms: $SLOW_PACE_MS" \
            --expect-events $((SLOW_EVENTS + 6)) --connect-timeout 30 --ramp "$ramp" \
            >"$raw" 2>"$LOGS/$tag-slow-$target.err" || log "warning: slow/$n/$target exited non-zero"
        t1=$(date +%s.%N)
        local peak=0 peak_pss=0 hwm=0
        if [[ -n $sampler ]]; then
            stop "$sampler"
            read -r peak peak_pss <"$peak_file"
            hwm=$(rss_kb VmHWM $gw_pids)
        fi
        record rep="$rep" workload='"slow"' streams="$n" target="\"$target\"" tool='"sse-load"' \
            raw="\"${raw#"$RESULTS"/}\"" idle_rss_kb="$idle_kb" peak_rss_kb="$peak" hwm_rss_kb="$hwm" \
            idle_pss_kb="$idle_pss_kb" peak_pss_kb="$peak_pss" ramp_s="$ramp" conn_budget="$budget" \
            wall_s="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
        # A proxy that ran out of descriptors says so in its log.
        case $target in
            nginx) grep -h -m3 -E 'Too many open files|worker_connections are not enough' \
                "$RESULTS/slow-nginx-$tag/error.log" 2>/dev/null | sed 's/^/    nginx: /' >&2 || true ;;
            ccgate | ccgate-h2) grep -h -m3 -E 'accept failed|max_connections|Too many open files' \
                "$LOGS/slow-$target-$tag.log" 2>/dev/null | sed "s/^/    $target: /" >&2 || true ;;
            hyper) grep -h -m3 -E 'accept|Too many open files' \
                "$LOGS/slow-hyper-$tag.log" 2>/dev/null | sed 's/^/    hyper: /' >&2 || true ;;
        esac
    done
    for g in "${!pid[@]}"; do stop "${pid[$g]}"; done
}

# --- failover: fresh gateways over mock A and a broken upstream ---------------------------------
failover_round() {
    local rep=$1 mode target broken_addr broken_pid
    for mode in status500 refused killed; do
        broken_pid=
        case $mode in
            status500)
                start_mock "fo-$mode-r$rep-mock" --fail-status 500
                broken_addr=$MOCK_ADDR; broken_pid=$MOCK_PID ;;
            refused)
                broken_addr=127.0.0.1:$(free_port) ;; # nothing listens there
            killed)
                start_mock "fo-$mode-r$rep-mock"
                broken_addr=$MOCK_ADDR; broken_pid=$MOCK_PID ;;
        esac
        for target in nginx ccgate; do
            local url gw_pid
            if [[ $target == nginx ]]; then
                start_nginx "fo-$mode-r$rep-nginx" "$G_MOCK_A_ADDR" "$broken_addr"
                url="http://$NGINX_ADDR/v1/messages"; gw_pid=$NGINX_PID
            else
                start_ccgate "fo-$mode-r$rep-ccgate" "$G_MOCK_A_ADDR" "$broken_addr"
                url="http://$CCGATE_ADDR/v1/messages"; gw_pid=$CCGATE_PID
            fi
            log "  failover/$mode/$target"
            local raw="$RAW/r$rep-failover_$mode-$target.json" killer=
            if [[ $mode == killed ]]; then
                # A healthy mock, killed (SIGKILL) a third into the run.
                (sleep "$(div "$DURATION" 3)"; kill -KILL "$broken_pid" 2>/dev/null || true) &
                killer=$!
                PIDS+=("$killer")
            fi
            oha_run "$FAILOVER_CONCURRENCY" "$url" -w >"$raw" 2>"$LOGS/r$rep-failover_$mode-$target.err" ||
                log "warning: failover/$mode/$target exited non-zero"
            if [[ -n $killer ]]; then wait "$killer" 2>/dev/null || true; stop "$killer"; fi
            record rep="$rep" workload="\"failover_$mode\"" body='"2k"' target="\"$target\"" tool='"oha"' \
                raw="\"${raw#"$RESULTS"/}\""
            # Keep the gateway's own view (ccgate) for the report.
            if [[ $target == ccgate ]]; then
                curl -s "http://$CCGATE_ADDR/_ccgate/endpoints" >"$RAW/r$rep-failover_$mode-ccgate-endpoints.json" || true
                curl -s "http://$CCGATE_ADDR/_ccgate/stats" >"$RAW/r$rep-failover_$mode-ccgate-stats.json" || true
            fi
            stop "$gw_pid"
            if [[ $mode == killed && $target == nginx ]]; then
                # the nginx run killed its mock: bring up a new one (on a new port) for ccgate
                stop "$broken_pid"
                start_mock "fo-$mode-r$rep-mock2"
                broken_addr=$MOCK_ADDR; broken_pid=$MOCK_PID
            fi
        done
        if [[ -n $broken_pid ]]; then stop "$broken_pid"; fi
    done
}

# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
main() {
    install_tools
    build
    raise_nofile

    # Request bodies shaped like Claude Code's (bench/payloads.py): 2k, 100k and 1m, streaming
    # and not. slow and failover use the 2k ones.
    python3 "$BENCH/payloads.py" "$RESULTS/payloads" >/dev/null
    local b bodies_desc=
    for b in "${BODY_LIST[@]}"; do
        [[ -f $RESULTS/payloads/$b.json ]] || die "bench/payloads.py wrote no $b body"
        bodies_desc+="${bodies_desc:+, }$b = $(wc -c <"$RESULTS/payloads/$b.json") bytes"
    done
    SLOW_BODY_FILE=$RESULTS/payloads/2k-stream.json
    log "request bodies: $bodies_desc; slow streams: ${SLOW_LIST[*]}"

    start_mock mock-a; G_MOCK_A_PID=$MOCK_PID; G_MOCK_A_ADDR=$MOCK_ADDR
    start_mock mock-b; G_MOCK_B_PID=$MOCK_PID; G_MOCK_B_ADDR=$MOCK_ADDR
    G_DIRECT_ADDR=$G_MOCK_A_ADDR
    if has slow && ((${#H2_LIST[@]})); then
        # ccgate-h2's upstreams: the same mock, speaking h2c (prior knowledge) beside HTTP/1.1.
        start_mock mock-h2-a --http2; G_H2_MOCK_A_ADDR=$MOCK_ADDR
        start_mock mock-h2-b --http2; G_H2_MOCK_B_ADDR=$MOCK_ADDR
    fi
    start_nginx nginx "$G_MOCK_A_ADDR" "$G_MOCK_B_ADDR"; G_NGINX_PID=$NGINX_PID; G_NGINX_ADDR=$NGINX_ADDR
    start_ccgate ccgate "$G_MOCK_A_ADDR" "$G_MOCK_B_ADDR"; G_CCGATE_PID=$CCGATE_PID; G_CCGATE_ADDR=$CCGATE_ADDR
    start hyper "$BARE" --port 0 --upstream "$G_MOCK_A_ADDR" --upstream "$G_MOCK_B_ADDR"
    G_HYPER_PID=$LAST_PID; G_HYPER_ADDR=$(wait_listening hyper "$G_HYPER_PID")
    sleep 1
    local idle
    idle=$(rss_kb VmRSS "$G_CCGATE_PID")
    record rep=0 workload='"idle"' target='"ccgate"' idle_rss_kb="$idle"
    record rep=0 workload='"idle"' target='"nginx"' idle_rss_kb="$(rss_kb VmRSS $(pids_of nginx))"
    log "mocks $G_MOCK_A_ADDR $G_MOCK_B_ADDR, nginx $G_NGINX_ADDR, ccgate $G_CCGATE_ADDR, bare hyper proxy $G_HYPER_ADDR (idle RSS ${idle} kB)"

    local t timed=0
    if has ns_c1 || has ns_c64 || has sse_c64; then timed=1; fi
    if ((timed)) && awk -v w="$WARMUP" 'BEGIN { exit !(w > 0) }'; then
        for t in direct nginx hyper ccgate; do
            for b in "${BODY_LIST[@]}"; do
                log "warm-up $t ($b body)"
                oha -z "${WARMUP}s" -c 64 -m POST -D "$RESULTS/payloads/$b.json" "${NS_HEADERS[@]}" --no-tui \
                    --output-format quiet "$(url_of "$t")" >/dev/null 2>&1 || true
            done
        done
    fi

    local rep n
    for rep in $(seq "$REPEATS"); do
        log "repeat $rep/$REPEATS (order: $(rotated "$rep"))"
        if ((timed)); then
            for CUR_BODY in "${BODY_LIST[@]}"; do
                BODY_FILE=$RESULTS/payloads/$CUR_BODY.json
                STREAM_BODY_FILE=$RESULTS/payloads/$CUR_BODY-stream.json
                if has ns_c1; then
                    for t in $(rotated "$rep"); do
                        log "  ns_c1/$CUR_BODY/$t"; measure "$rep" ns_c1 "$t" oha oha_run 1 "$(url_of "$t")"
                    done
                fi
                if has ns_c64; then
                    for t in $(rotated "$rep"); do
                        log "  ns_c64/$CUR_BODY/$t"; measure "$rep" ns_c64 "$t" oha oha_run 64 "$(url_of "$t")"
                    done
                fi
                if has sse_c64; then
                    for t in $(rotated "$rep"); do
                        log "  sse_c64/$CUR_BODY/$t"
                        measure "$rep" sse_c64 "$t" sse-load sse_run 64 "$(url_of "$t")" --duration "$DURATION"
                    done
                fi
            done
        fi
        if has slow; then
            for n in $(printf '%s\n' "${SLOW_LIST[@]}" "${H2_LIST[@]}" | sort -n -u); do slow_round "$rep" "$n"; done
        fi
        if has failover; then
            CUR_BODY=2k BODY_FILE=$RESULTS/payloads/2k.json
            failover_round "$rep"
        fi
    done

    # ccgate's own view of the main run, for the record.
    curl -s "http://$G_CCGATE_ADDR/_ccgate/endpoints" >"$RESULTS/ccgate-endpoints.json" || true
    curl -s "http://$G_CCGATE_ADDR/_ccgate/stats" >"$RESULTS/ccgate-stats.json" || true
    record rep=0 workload='"final"' target='"ccgate"' rss_kb="$(rss_kb VmRSS "$G_CCGATE_PID")" \
        hwm_kb="$(rss_kb VmHWM "$G_CCGATE_PID")"

    # Machine and run facts for the report.
    {
        echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "nproc=$(nproc)"
        echo "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
        echo "mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
        echo "kernel=$(uname -r)"
        echo "loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
        echo "nginx=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
        echo "oha=$(oha --version)"
        echo "rustc=$(rustc --version)"
        echo "ccgate=$CCGATE_VERSION"
        echo "ccgate_log=${CCGATE_RUST_LOG:-ccgate default (info: one line per request), stderr to a file}"
        echo "command=$COMMAND_LINE"
        echo "duration=$DURATION"
        echo "repeats=$REPEATS"
        echo "slow_streams=${SLOW_LIST[*]}"
        echo "slow_streams_h2=${H2_LIST[*]}"
        local ramps= budgets=
        for n in $(printf '%s\n' "${SLOW_LIST[@]}" "${H2_LIST[@]}" | sort -n -u); do
            ramps+="${ramps:+ }$(slow_ramp "$n")"; budgets+="${budgets:+ }$(conn_budget "$n")"
        done
        echo "slow_ramp_s=$ramps"
        echo "slow_conn_budget=$budgets"
        echo "slow_events_total_ms=$((SLOW_EVENTS * SLOW_PACE_MS))"
        echo "slow_body_bytes=$(wc -c <"$SLOW_BODY_FILE")"
        echo "nofile=$NOFILE"
        echo "nofile_hard=$(ulimit -Hn)"
        echo "slow_events=$SLOW_EVENTS"
        echo "slow_pace_ms=$SLOW_PACE_MS"
        echo "stream_events=$STREAM_EVENTS"
        echo "stream_pace_ms=$STREAM_PACE_MS"
        echo "stream_ramp_s=$STREAM_RAMP_S"
        echo "failover_concurrency=$FAILOVER_CONCURRENCY"
        echo "bodies=${BODY_LIST[*]}"
        for b in "${BODY_LIST[@]}"; do
            echo "body_bytes_$b=$(wc -c <"$RESULTS/payloads/$b.json")"
            echo "stream_body_bytes_$b=$(wc -c <"$RESULTS/payloads/$b-stream.json")"
        done
        echo "workloads=$WORKLOADS"
        echo "results=${RESULTS#"$ROOT"/}"
    } >"$RESULTS/meta.env"

    # ccgate logs one line per request at `info`: trim big logs.
    local f
    for f in "$LOGS"/*.log; do
        if (($(stat -c %s "$f") > 1048576)); then
            {
                head -n 100 "$f"
                echo "[... $(wc -l <"$f") lines in all; trimmed by bench/run.sh to the head, every non-INFO line (at most 5000) and the tail ...]"
                sed -n '101,$p' "$f" | grep -v 'INFO' | head -n 5000 || true
                echo "[... tail ...]"
                tail -n 100 "$f"
            } >"$f.trim"
            mv "$f.trim" "$f"
        fi
    done

    python3 "$BENCH/report.py" "$RESULTS" "$OUT"
    log "wrote $OUT and $RESULTS"
}

main "$@"
