#!/usr/bin/env bash
# A ccgate cluster on one machine: one Redis, three ccgate instances sharing it, and nginx in front
# (round robin over the three, the next one on a connection error), all on loopback.
#
#     examples/cluster/run.sh config.toml      # your ccgate config: its [[endpoints]] and settings
#
# Clients (Claude Code: ANTHROPIC_BASE_URL=http://127.0.0.1:8080) talk to nginx on 127.0.0.1:8080;
# the instances listen on 127.0.0.1:7861-7863, Redis on 127.0.0.1:6390. Each instance gets the
# given config plus its own [server] listen address, its own database, and a [cluster] table
# naming it (i1, i2, i3). Ctrl-C stops everything. Needs redis-server and nginx
# (apt-get install -y redis-server nginx) and a ccgate binary (CCGATE, default: ccgate on PATH,
# else target/release/ccgate). The file given holds [[endpoints]] (and [health], [affinity], ...
# if wanted) but no [server], [storage] or [cluster] table: this script writes those per instance.
set -euo pipefail
CONFIG=${1:?usage: examples/cluster/run.sh CONFIG.toml}
CCGATE=${CCGATE:-$(command -v ccgate || echo target/release/ccgate)}
REDIS_PORT=${REDIS_PORT:-6390}
LB_PORT=${LB_PORT:-8080}
DIR=$(mktemp -d /tmp/ccgate-cluster.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT INT TERM
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install -y redis-server" >&2; exit 1; }
command -v nginx >/dev/null || { echo "needs nginx: apt-get install -y nginx" >&2; exit 1; }

# Redis: no persistence here; ccgate repopulates an empty Redis by itself (a restart is harmless).
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &

for i in 1 2 3; do
    mkdir -p "$DIR/i$i"
    {
        printf '[server]\nlisten = "127.0.0.1:786%s"\n\n' "$i"
        cat "$CONFIG"
        printf '\n[storage]\npath = "%s/i%s/ccgate.db"\n' "$DIR" "$i"
        printf '\n[cluster]\nredis_url = "redis://127.0.0.1:%s"\nkey_prefix = "ccgate"\ninstance = "i%s"\n' "$REDIS_PORT" "$i"
    } >"$DIR/i$i/config.toml"
    "$CCGATE" serve --config "$DIR/i$i/config.toml" >"$DIR/i$i/out.log" 2>"$DIR/i$i/err.log" &
done

cat >"$DIR/nginx.conf" <<NGINX
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    upstream ccgate {
        server 127.0.0.1:7861 max_fails=1 fail_timeout=5s;
        server 127.0.0.1:7862 max_fails=1 fail_timeout=5s;
        server 127.0.0.1:7863 max_fails=1 fail_timeout=5s;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$LB_PORT;
        location / {
            proxy_pass http://ccgate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;  # the client's own (a loopback name): without an
                                                # access_token ccgate refuses other Host names
            proxy_buffering off;              # streamed answers (SSE) pass through as they come
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout; # only when an instance is unreachable, never after it answered
            client_max_body_size 32m;
        }
    }
}
NGINX
sleep 1
nginx -c "$DIR/nginx.conf" -g 'daemon off;' &

echo "ccgate cluster: clients -> http://127.0.0.1:$LB_PORT (nginx) -> 127.0.0.1:7861-7863 -> Redis 127.0.0.1:$REDIS_PORT"
echo "cluster view:   curl -s http://127.0.0.1:7861/_ccgate/cluster   or   ccgate status --cluster --url http://127.0.0.1:7861"
echo "logs in $DIR; Ctrl-C stops everything"
wait
