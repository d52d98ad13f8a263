#!/usr/bin/env python3
"""Eject -> refuse propagation across a ccgate cluster (issue #13), on loopback.

Starts one redis-server, a scriptable upstream (this file: 500s while "failing", else 200), and
three `ccgate serve` instances sharing the Redis. Each trial makes instance 1 eject endpoint `a`
(two failing attempts, threshold 2; endpoint `b` serves the clients meanwhile), then measures the
time from instance 1's second failing answer (by then it has ejected `a`: the transition happens
before it fails over) until instances 2 and 3 both report `a` out of rotation, polling their
`/_ccgate/endpoints/a` in a tight loop (so each figure includes up to one poll round trip). Then
`a` recovers (probe on instance 1, one request on probation) before the next trial.

Usage: bench/cluster-propagation.sh   (TRIALS=100 CCGATE=target/release/ccgate)
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRIALS = int(os.environ.get("TRIALS", "100"))
BIN = os.environ.get("CCGATE", "target/release/ccgate")


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        if getattr(self.server, "failing", False):
            status, body = 500, {"type": "error", "error": {"type": "api_error", "message": "boom"}}
        else:
            status, body = 200, {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "output_tokens": 1}, "data": [],
            }
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(addr, method, path, body=None):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


MESSAGE = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})


def state(addr, name="a"):
    return json.loads(call(addr, "GET", f"/_ccgate/endpoints/{name}")[1])["state"]


def wait(what, check, timeout=20):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if check():
            return
        time.sleep(0.005)
    sys.exit(f"timed out waiting for {what}")


def main():
    tmp = tempfile.mkdtemp(prefix="ccgate-propagation-")
    procs = []
    try:
        up_a = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        up_b = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
        for s in (up_a, up_b):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        rport = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)
        addrs = []
        for i in (1, 2, 3):
            d = os.path.join(tmp, f"i{i}")
            os.makedirs(d)
            cfg = os.path.join(d, "config.toml")
            with open(cfg, "w") as f:
                f.write(f"""[server]
listen = "127.0.0.1:0"
[health]
failure_threshold = 2
probe_interval = "30s"
[storage]
enabled = false
[cluster]
redis_url = "redis://127.0.0.1:{rport}"
key_prefix = "bench"
instance = "i{i}"
[[endpoints]]
name = "a"
base_url = "http://127.0.0.1:{up_a.server_address[1]}"
api_key = "sk-bench-a"
priority = 1
probe = "models"
[[endpoints]]
name = "b"
base_url = "http://127.0.0.1:{up_b.server_address[1]}"
api_key = "sk-bench-b"
priority = 2
""")
            env = {"HOME": d, "PATH": os.environ.get("PATH", ""), "RUST_LOG": "warn"}
            p = subprocess.Popen([BIN, "serve", "--config", cfg], stdout=subprocess.PIPE,
                                 stderr=open(os.path.join(d, "log"), "w"), env=env, text=True)
            procs.append(p)
            line = p.stdout.readline()
            addrs.append(line.strip().removeprefix("listening on http://"))
        for a in addrs:
            wait("redis link", lambda a=a: json.loads(call(a, "GET", "/_ccgate/health")[1])
                 .get("cluster", {}).get("redis_up"))
        one, others = addrs[0], addrs[1:]
        results = []
        for t in range(TRIALS):
            up_a.failing = True
            call(one, "POST", "/v1/messages", MESSAGE)
            call(one, "POST", "/v1/messages", MESSAGE)
            t0 = time.monotonic()
            seen = {}

            def watch(addr):
                while state(addr) != "ejected":
                    pass
                seen[addr] = time.monotonic() - t0

            threads = [threading.Thread(target=watch, args=(a,)) for a in others]
            for th in threads:
                th.start()
            for th in threads:
                th.join(20)
            if len(seen) != len(others):
                sys.exit(f"trial {t}: not ejected everywhere")
            if state(one) != "ejected":
                sys.exit(f"trial {t}: instance 1 did not eject")
            results.append(max(seen.values()))
            # Recover: a passing probe on instance 1, one request on probation, all back.
            up_a.failing = False
            call(one, "POST", "/_ccgate/endpoints/a/probe")
            wait("recovery", lambda: (call(one, "POST", "/v1/messages", MESSAGE) and False)
                 or all(state(a) in ("healthy", "degraded") and
                        json.loads(call(a, "GET", "/_ccgate/failure-queue")[1])["size"] == 0
                        for a in addrs))
        results.sort()
        pct = lambda q: results[min(len(results) - 1, int(q * len(results)))] * 1000
        print(f"eject -> refuse on every other instance, {len(results)} trials: "
              f"p50 {pct(0.50):.1f} ms, p90 {pct(0.90):.1f} ms, p99 {pct(0.99):.1f} ms, "
              f"max {results[-1] * 1000:.1f} ms")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
