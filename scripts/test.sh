#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what the test suites need
# from outside Cargo when it is missing, then runs `cargo test --locked` with any arguments given.
#   - /usr/bin/chromium: tests/dashboard.rs drives a real headless Chromium.
#   - redis-server: tests/cluster_redis.rs starts a real Redis on a free loopback port.
# Idempotent: with everything present it only runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y "${missing[@]}"
fi

exec cargo test --locked "$@"
