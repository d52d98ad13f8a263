# Helpers the bench scripts share (sourced by bench/*.sh and scripts/pgo.sh).

# addr LOG : the address a gateway or mock announced in LOG ("listening on ..."), waiting up to
# 10 s for it; exits the script when none comes.
addr() {
    local a
    for _ in $(seq 100); do
        a=$(grep -o 'listening on [^ ]*' "$1" 2>/dev/null | head -n1 | awk '{print $3}' | sed 's|http://||')
        [[ -n $a ]] && { echo "$a"; return; }
        sleep 0.1
    done
    echo "no listen address in $1" >&2
    exit 1
}

# free_port : a free port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# two_endpoints FILE A B [EXTRA [TABLES]] : a ccgate config (mode 600) over the mocks at A and B,
# endpoints "a" and "b" with the key "k"; EXTRA is added to each endpoint, TABLES (whole TOML
# tables, ending in a blank line) go between [server] and the endpoints.
two_endpoints() {
    local file=$1 a=$2 b=$3 extra=${4:-} tables=${5:-}
    printf '[server]\nlisten = "127.0.0.1:0"\n\n%s[[endpoints]]\nname = "a"\nbase_url = "http://%s"\napi_key = "k"\n%s\n\n[[endpoints]]\nname = "b"\nbase_url = "http://%s"\napi_key = "k"\n%s\n' \
        "$tables" "$a" "$extra" "$b" "$extra" >"$file"
    chmod 600 "$file"
}
