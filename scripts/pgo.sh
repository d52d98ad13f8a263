#!/usr/bin/env bash
# A release build of ccgate optimised with a profile of its own request path (profile-guided
# optimisation). The compiler lays the hot code out together and inlines by measured call counts,
# which matters most where a request runs on cold caches (one client at a time).
#
#   scripts/pgo.sh                  writes target/pgo/ccgate
#   TRAIN_S=4 scripts/pgo.sh        seconds of each training load (default 4)
#
# Steps: an instrumented build; a training run of that build over the bench's two mock upstreams
# (non-streaming and streaming Messages calls with the Claude-Code-shaped bodies of
# bench/payloads.py, one client and many, plus a few answers an endpoint fails with); the counts
# merged; the optimised build. Needs the `llvm-tools` rustup component (added when missing), `oha`
# (`cargo install oha`) and python3. The result behaves exactly as `cargo build --release` does:
# only code layout and inlining change, and the whole test suite runs against either.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/target/pgo
TRAIN_S=${TRAIN_S:-4}
log() { printf '[pgo] %s\n' "$*" >&2; }

command -v oha >/dev/null || { echo "pgo: oha is needed: cargo install oha --locked" >&2; exit 1; }
sysroot=$(rustc --print sysroot)
profdata=$(find "$sysroot" -name llvm-profdata -type f 2>/dev/null | head -n1)
if [[ -z $profdata ]]; then
    log "adding the llvm-tools component"
    rustup component add llvm-tools >&2
    profdata=$(find "$sysroot" -name llvm-profdata -type f | head -n1)
fi

# The host's triple given explicitly, so that RUSTFLAGS reach ccgate and its dependencies but not
# the build scripts and proc macros (which would write profiles of their own while compiling).
host=$(rustc -vV | sed -n 's/^host: //p')
rm -rf "$OUT/profiles" "$OUT/train"
mkdir -p "$OUT/profiles" "$OUT/train"

log "instrumented build"
RUSTFLAGS="-Cprofile-generate=$OUT/profiles" \
    cargo build --release --locked --target "$host" --target-dir "$OUT/gen" >&2
log "mock upstreams"
cargo build --release --locked --manifest-path bench/mock-upstream/Cargo.toml >&2
T=${CARGO_TARGET_DIR:-$ROOT/bench/mock-upstream/target}/release

cd "$OUT/train"
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT
python3 "$ROOT/bench/payloads.py" . >/dev/null
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
# The mocks also speak h2c, for the round with `http2 = true` endpoints.
"$T/mock-upstream" --port 0 --http2 >mock-a.log 2>&1 &
"$T/mock-upstream" --port 0 --http2 >mock-b.log 2>&1 &
A=$(addr mock-a.log); B=$(addr mock-b.log)
# gateway CONFIG: starts the instrumented gateway, with a state of its own (the first run's
# endpoints end ejected by the failing answers); sets gw (its pid) and url.
gateway() {
    : >gateway.log
    mkdir -p "data-$1"
    XDG_DATA_HOME=$PWD/data-$1 XDG_STATE_HOME=$PWD/data-$1 RUST_LOG=warn \
        "$OUT/gen/$host/release/ccgate" serve --config "$1" >gateway.log 2>&1 &
    gw=$!
    url=http://$(addr gateway.log)/v1/messages
}
# The profile is written when the gateway exits.
stop_gateway() { kill -TERM "$gw"; wait "$gw" || true; }
two_endpoints h1.toml "$A" "$B"
two_endpoints h2.toml "$A" "$B" "http2 = true"
gateway h1.toml
headers=(-H 'content-type: application/json' -H 'anthropic-version: 2023-06-01')

log "training: non-streaming"
for body in 2k 100k 1m; do
    for c in 1 32; do
        oha -z "${TRAIN_S}s" -c "$c" -m POST -D "$body.json" "${headers[@]}" --no-tui "$url" >/dev/null
    done
done
log "training: streams"
for body in 2k 100k; do
    for c in 1 32; do
        "$T/sse-load" --url "$url" -c "$c" --duration "$TRAIN_S" --body "$body-stream.json" \
            -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 1' --expect-events 26 >/dev/null
    done
done
log "training: failing answers"
for status in 429 500 529 400; do
    oha -n 200 -c 4 -m POST -D 2k.json "${headers[@]}" -H "x-mock-fail-status: $status" --no-tui "$url" >/dev/null
done
stop_gateway
log "training: HTTP/2 to the upstreams"
gateway h2.toml
oha -z "${TRAIN_S}s" -c 32 -m POST -D 2k.json "${headers[@]}" --no-tui "$url" >/dev/null
"$T/sse-load" --url "$url" -c 32 --duration "$TRAIN_S" --body 2k-stream.json \
    -H 'x-mock-events: 20' -H 'x-mock-pace-ms: 1' --expect-events 26 >/dev/null
stop_gateway
cd "$ROOT"
ls "$OUT"/profiles/*.profraw >/dev/null 2>&1 || { echo "pgo: the training run wrote no profile" >&2; exit 1; }

log "merging"
"$profdata" merge -o "$OUT/merged.profdata" "$OUT/profiles"
log "optimised build"
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" \
    cargo build --release --locked --target "$host" --target-dir "$OUT/use" >&2
cp "$OUT/use/$host/release/ccgate" "$OUT/ccgate"
log "done: $OUT/ccgate"
