#!/usr/bin/env bash
# Eject -> refuse propagation time across three ccgate instances sharing one Redis (issue #13):
# p50/p90/p99 over TRIALS (default 100) trials on loopback. Target: p99 under 1 s.
#
#     bench/cluster-propagation.sh                 # release build (built if missing)
#     TRIALS=300 bench/cluster-propagation.sh
#     CCGATE=target/debug/ccgate bench/cluster-propagation.sh
#
# Needs redis-server (apt-get install -y redis-server) and python3 (the driver and the scriptable
# upstream are bench/cluster_propagation.py, standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is needed: apt-get install -y redis-server" >&2; exit 1; }
export CCGATE=${CCGATE:-target/release/ccgate}
[[ -x $CCGATE ]] || cargo build --release
exec python3 bench/cluster_propagation.py
