#!/usr/bin/env python3
"""Turns one bench/run.sh results directory into BENCHMARKS.md.

    python3 bench/report.py bench/results/latest BENCHMARKS.md

Reads RESULTS/runs.jsonl (one line per measured run), the raw outputs it names (oha JSON, sse-load
JSON) and RESULTS/meta.env; takes medians over repeats and writes the Markdown report: the targets
of issue #22 first, then the timed workloads per request body size, CPU per request by body size,
the slow-stream memory per gateway (idle, peak at each stream count, the slope per stream), failover,
the earlier targets of issue #6, the spread over repeats and every failure seen.

Runs are keyed by (workload, variant, target): the variant is the body size (`2k`, `100k`, `1m`) for
ns_c1, ns_c64 and sse_c64, the stream count for slow, empty for the rest. Results of older runs
(one body, one stream count, no `body` / `streams` field) still load: their variant comes from
meta.env.
"""

import json
import os
import statistics
import sys

TARGETS = ["direct", "nginx", "hyper", "ccgate"]
GATEWAYS = ["nginx", "hyper", "ccgate"]
BODY_ORDER = ["2k", "100k", "1m"]
TIMED = ("ns_c1", "ns_c64", "sse_c64")


def load(results):
    runs = []
    with open(os.path.join(results, "runs.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    meta = {}
    with open(os.path.join(results, "meta.env")) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            meta[k] = v
    return runs, meta


def read_raw(results, rel):
    try:
        with open(os.path.join(results, rel)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def oha_metrics(d, run):
    """Metrics of one oha run; throughput counts 2xx answers only."""
    if not d:
        return {"broken": 1}
    codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items()
              if k != "aborted due to deadline"}
    ok = sum(v for k, v in codes.items() if 200 <= k < 300)
    answered = sum(codes.values())
    failed = answered - ok + sum(errors.values())
    total_s = d["summary"]["total"] or 1
    lp = d.get("latencyPercentiles") or {}
    m = {
        "ok": ok,
        "failed": failed,
        "success": ok / max(1, ok + failed),
        "rps": ok / total_s,
        "p50_ms": (lp.get("p50") or 0) * 1000,
        "p99_ms": (lp.get("p99") or 0) * 1000,
        "codes": codes,
        "errors": errors,
    }
    if "gw_cpu_s" in run and ok:
        m["gw_cpu_us_per_req"] = run["gw_cpu_s"] / ok * 1e6
        if "gw_user_s" in run:
            m["gw_user_us_per_req"] = run["gw_user_s"] / ok * 1e6
            m["gw_sys_us_per_req"] = (run["gw_cpu_s"] - run["gw_user_s"]) / ok * 1e6
        m["mocks_cpu_us_per_req"] = run["mocks_cpu_s"] / ok * 1e6
        m["gw_cpu_share"] = run["gw_cpu_s"] / max(1e-9, run["wall_s"])
    return m


def sse_metrics(d, run):
    if not d:
        return {"broken": 1}
    m = {
        "ok": d["completed"],
        "failed": d["errors"],
        "error_kinds": d.get("error_kinds", {}),
        "success": d["success_rate"],
        "sps": d["streams_per_s"],
        "ttfb_p50_ms": (d["ttfb_ms"] or {}).get("p50") or 0,
        "ttfb_p99_ms": (d["ttfb_ms"] or {}).get("p99") or 0,
        "ttfc_p50_ms": (d.get("ttfc_ms") or {}).get("p50"),
        "ttfc_p99_ms": (d.get("ttfc_ms") or {}).get("p99"),
        # The mock's stamps split TTFC into the request's way up and the first event's way back.
        "req_path_p50_ms": (d.get("request_path_ms") or {}).get("p50"),
        "first_relay_p50_ms": (d.get("first_content_relay_ms") or {}).get("p50"),
        "total_p50_ms": (d["total_ms"] or {}).get("p50") or 0,
        "total_max_ms": (d["total_ms"] or {}).get("max") or 0,
        "gap_p50_ms": (d["max_gap_ms"] or {}).get("p50") or 0,
        "events": d.get("events_per_stream", 0),
        "frames": d.get("frames_per_stream", 0),
    }
    if "gw_cpu_s" in run and d["completed"]:
        m["gw_cpu_us_per_req"] = run["gw_cpu_s"] / d["completed"] * 1e6
        if "gw_user_s" in run:
            m["gw_user_us_per_req"] = run["gw_user_s"] / d["completed"] * 1e6
        m["gw_cpu_share"] = run["gw_cpu_s"] / max(1e-9, run["wall_s"])
    for k in ("idle_rss_kb", "peak_rss_kb", "hwm_rss_kb", "idle_pss_kb", "peak_pss_kb"):
        if k in run:
            m[k] = run[k]
    return m


def collect(results, runs, meta):
    """{(workload, variant, target): [metrics per repeat]}"""
    default_body = meta.get("bodies", "").split()[:1] or ["2k"]
    default_streams = int((meta.get("slow_streams") or "0").split()[0] or 0)
    out = {}
    for r in runs:
        wl, tgt = r["workload"], r["target"]
        if wl in ("idle", "final"):
            out.setdefault((wl, "", tgt), []).append(r)
            continue
        if wl in TIMED:
            variant = r.get("body", default_body[0])
        elif wl == "slow":
            variant = int(r.get("streams", default_streams))
        else:
            variant = ""
        d = read_raw(results, r["raw"])
        m = oha_metrics(d, r) if r["tool"] == "oha" else sse_metrics(d, r)
        m["rep"] = r["rep"]
        out.setdefault((wl, variant, tgt), []).append(m)
    return out


def med(data, wl, var, tgt, key):
    vals = [m[key] for m in data.get((wl, var, tgt), []) if key in m and m[key] is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, int) and abs(v) >= 1000:
        return f"{v:,}"
    return f"{v:.{nd}f}"


def signed(v, nd=3):
    return "—" if v is None else f"{v:+.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def sub(a, b):
    return None if a is None or b is None else a - b


def yes(b):
    return "—" if b is None else ("met" if b else "**not met**")


def mb(kb):
    return None if kb is None else kb / 1024


def main():
    results, out_md = sys.argv[1], sys.argv[2]
    results = os.path.realpath(results)
    runs, meta = load(results)
    data = collect(results, runs, meta)
    bodies = sorted({k[1] for k in data if k[0] in TIMED},
                    key=lambda b: BODY_ORDER.index(b) if b in BODY_ORDER else 99)
    counts = sorted({k[1] for k in data if k[0] == "slow"})
    has = lambda wl, var=None: any(k[0] == wl and (var is None or k[1] == var) for k in data)  # noqa: E731

    def stream_ramp_note(meta):
        """How sse_c64's workers started: together (waves of 64) unless the run spread them."""
        ramp = float(meta.get("stream_ramp_s") or 0)
        if ramp > 0:
            return f" The 64 workers' first streams were spread over {ramp:g} s (`STREAM_RAMP_S`)."
        return " The 64 workers start together, so their streams run in waves of 64."

    def body_label(b):
        n = meta.get(f"body_bytes_{b}")
        return f"{b} ({int(n):,} bytes)" if n else b

    L = []
    w = L.append

    w("# Benchmarks: ccgate beside nginx, a bare hyper proxy and a direct connection")
    w("")
    w("Produced by `bench/run.sh` (issues #6 and #22). **Ratios are what count**: the machine is shared")
    w("and noisy, and the load generator, the proxies and both mock upstreams all share its "
      f"{meta.get('nproc', '?')} cores (nothing is pinned), so absolute numbers move from run to run.")
    w("Targets alternate (direct / nginx / hyper / ccgate, order rotated every repeat) so noise hits all alike;")
    nrep = meta.get("repeats")
    w(f"every number below is the **median over {nrep} repeat{'' if nrep == '1' else 's'}**.")
    w("")

    # ---------------- targets of issue #22 ----------------
    lo, hi = (counts[0], counts[-1]) if counts else (None, None)

    def ran(tgt, key="peak_pss_kb"):
        """The stream counts whose slow round `tgt` ran (a gateway may sit out a round that does
        not fit its open-file limit)."""
        return [c for c in counts if med(data, "slow", c, tgt, key) is not None]

    def span(tgt, key="peak_pss_kb"):
        """The smallest and largest count `tgt` ran, or None with fewer than two."""
        r = ran(tgt, key)
        return (r[0], r[-1]) if len(r) > 1 else None

    # ccgate over HTTP/2 (`run.sh`'s slow rounds with SLOW_H2=1): a gateway of the slow tables only.
    h2_ran = ran("ccgate-h2")
    slow_extra = ["ccgate-h2"] if h2_ran else []

    def slope(tgt, key, over=None):
        """Memory per extra stream between the counts of `over` (default: `tgt`'s own span)."""
        sp = over or span(tgt, key)
        if sp is None:
            return None
        a, b = med(data, "slow", sp[0], tgt, key), med(data, "slow", sp[1], tgt, key)
        return None if a is None or b is None else (b - a) / (sp[1] - sp[0])

    def cpu_target(wl, label, nd):
        for b in bodies:
            c = med(data, wl, b, "ccgate", "gw_cpu_us_per_req")
            n = med(data, wl, b, "nginx", "gw_cpu_us_per_req")
            if c is not None and n:
                w(f"| {label} at c=64 ≤ 1.0× nginx | {b} body | {c / n:.2f}× "
                  f"({c:.{nd}f} vs {n:.{nd}f} µs) | {yes(c <= n)} |")

    w("## Targets of issue #22")
    w("")
    w("| target | at | measured (ccgate vs nginx) | met? |")
    w("|---|---|---|---|")
    for b in bodies:
        c, n = med(data, "ns_c64", b, "ccgate", "rps"), med(data, "ns_c64", b, "nginx", "rps")
        if c is not None and n:
            w(f"| throughput at c=64 ≥ 1.1× nginx | {b} body | {c / n:.2f}× ({fmt(c, 0)} vs {fmt(n, 0)} req/s) "
              f"| {yes(c >= 1.1 * n)} |")
    cpu_target("ns_c64", "CPU per request", 1)
    for b in bodies:
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            c, n = med(data, "ns_c1", b, "ccgate", key), med(data, "ns_c1", b, "nginx", key)
            if c is not None and n is not None:
                w(f"| latency {label} at c=1 ≤ nginx | {b} body | {c:.3f} vs {n:.3f} ms ({c / n:.2f}×) "
                  f"| {yes(c <= n)} |")
    if lo is not None:
        c, n = med(data, "slow", lo, "ccgate", "peak_pss_kb"), med(data, "slow", lo, "nginx", "peak_pss_kb")
        cr, nr = med(data, "slow", lo, "ccgate", "peak_rss_kb"), med(data, "slow", lo, "nginx", "peak_rss_kb")
        if c is not None and n:
            w(f"| slow streams: peak memory ≤ 1.0× nginx | {lo:,} streams | PSS {c / n:.2f}× "
              f"({mb(c):.1f} vs {mb(n):.1f} MB; RSS {ratio(cr, nr)}) | {yes(c <= n)} |")
    sp = span("ccgate")
    if sp is not None:
        sc, sn, src = slope("ccgate", "peak_pss_kb"), slope("nginx", "peak_pss_kb", sp), slope("ccgate", "peak_rss_kb", sp)
        w(f"| slow streams: memory slope ≤ 20 KB/stream | {sp[0]:,} → {sp[1]:,} streams | PSS {sc:.1f} KB/stream "
          f"(nginx {fmt(sn, 1)}; RSS {fmt(src, 1)}) | {yes(sc <= 20)} |")
    elif counts:
        w(f"| slow streams: memory slope ≤ 20 KB/stream | — | needs two stream counts (this run: "
          f"{', '.join(str(x) for x in counts)}) | — |")
    # The same two targets for ccgate with `http2 = true` on its endpoints (the slow rounds'
    # ccgate-h2), against the same nginx (HTTP/1.1 to its upstreams, the only way it proxies).
    if h2_ran:
        h2lo = h2_ran[0]
        c, n = med(data, "slow", h2lo, "ccgate-h2", "peak_pss_kb"), med(data, "slow", h2lo, "nginx", "peak_pss_kb")
        if n:
            w(f"| … with HTTP/2 to the upstreams (`http2 = true`) | {h2lo:,} streams | PSS {c / n:.2f}× "
              f"({mb(c):.1f} vs {mb(n):.1f} MB) | {yes(c <= n)} |")
    sp2 = span("ccgate-h2")
    if sp2 is not None:
        s2, n2 = slope("ccgate-h2", "peak_pss_kb"), slope("nginx", "peak_pss_kb", sp2)
        w(f"| … with HTTP/2 to the upstreams (`http2 = true`) | {sp2[0]:,} → {sp2[1]:,} streams | "
          f"PSS {s2:.1f} KB/stream (nginx {fmt(n2, 1)}) | {yes(s2 <= 20)} |")
    cpu_target("sse_c64", "streaming: CPU per stream", 0)
    for b in bodies:
        c = med(data, "sse_c64", b, "ccgate", "ttfc_p50_ms")
        n = med(data, "sse_c64", b, "nginx", "ttfc_p50_ms")
        if c is not None and n is not None:
            w(f"| streaming: time to first content event p50 ≤ nginx + 0.1 ms | {b} body | "
              f"{c - n:+.3f} ms ({c:.3f} vs {n:.3f} ms) | {yes(c <= n + 0.1)} |")
    w("")

    # ---------------- run facts ----------------
    w("## The run")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| command | `{meta.get('command')}` |")
    w(f"| date | {meta.get('date')} |")
    w(f"| machine | {meta.get('nproc')} × {meta.get('cpu')}, {meta.get('mem')}, Linux {meta.get('kernel')} |")
    w(f"| load average at the end | {meta.get('loadavg')} |")
    w(f"| open files (soft / hard limit) | {meta.get('nofile', '?')} / {meta.get('nofile_hard', '?')} |")
    w(f"| ccgate | {meta.get('ccgate')} (release), 2 endpoints of equal priority; log level: {meta.get('ccgate_log')} |")
    w(f"| nginx | {meta.get('nginx')}, `worker_processes auto`, upstream keep-alive, `proxy_buffering off`, "
      "`proxy_next_upstream error timeout http_5xx non_idempotent`, `client_body_buffer_size 2m` "
      "(request bodies kept in memory, as ccgate does) |")
    w(f"| load generators | {meta.get('oha')} (non-streaming), `sse-load` from bench/mock-upstream (streaming) |")
    if bodies:
        w(f"| timed runs | {meta.get('duration')} s each; request bodies: "
          + ", ".join(body_label(b) for b in bodies) + " (bench/payloads.py, Claude Code's shape) |")
    if counts:
        ramps = meta.get("slow_ramp_s", "").split()
        budgets = meta.get("slow_conn_budget", "").split()
        per = []
        for i, c in enumerate(counts):
            r = f"connects over {float(ramps[i]):g} s" if i < len(ramps) else ""
            bgt = f"connection budget {int(budgets[i]):,}" if i < len(budgets) else ""
            per.append(f"{c:,} ({', '.join(x for x in (r, bgt) if x)})")
        w(f"| slow streams | {'; '.join(per)}: concurrent streams of {meta.get('slow_events')} events "
          f"{meta.get('slow_pace_ms')} ms apart, 2k body; the connection budget is nginx's `worker_connections` "
          "and ccgate's `max_connections` (2 × streams + 1024, at least 4096) |")
    w(f"| raw results | `{meta.get('results')}/` |")
    w("")
    w("*direct* is the client talking straight to mock A; *nginx* and *ccgate* spread the same load "
      "over mocks A and B. *hyper* is `bare-proxy` (bench/mock-upstream/src/bin/bare-proxy.rs) over the "
      "same two mocks: the leanest reverse proxy hyper and tokio allow, with ccgate's threading (a "
      "single-threaded runtime per core, per-worker upstream connections) and none of its features "
      "(no failover, accounting, body buffering or header rewriting). It is a yardstick, not a "
      "contender: *ccgate − hyper* is what ccgate's features cost, *hyper − nginx* what the stack "
      "costs. It takes part in every workload but failover, which it cannot do.")
    w("")

    # ---------------- per body ----------------
    def table_head():
        w("| workload | metric | direct | nginx | hyper | ccgate | ccgate/direct | ccgate/nginx | ccgate/hyper |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(wl, var, label, key, nd=2, show_direct=True, scale=1.0):
        vals = [med(data, wl, var, t, key) for t in TARGETS]
        vals = [None if v is None else v * scale for v in vals]
        d, n, h, c = vals
        if not show_direct:
            d = None
        w(f"| {wl} | {label} | {fmt(d, nd)} | {fmt(n, nd)} | {fmt(h, nd)} | {fmt(c, nd)} "
          f"| {ratio(c, d)} | {ratio(c, n)} | {ratio(c, h)} |")

    def diff_row(wl, var, label, key, base, nd=3):
        """Each target's value minus `base`'s (direct or nginx), in the metric's unit."""
        b = med(data, wl, var, base, key)
        vals = [sub(med(data, wl, var, t, key), b) for t in TARGETS]
        cells = ["—" if t == base or t == "direct" else signed(v, nd) for t, v in zip(TARGETS, vals)]
        w(f"| {wl} | {label} | " + " | ".join(cells) + " | — | — | — |")

    if bodies:
        w("## Results by request body size")
        w("")
        w("Gateway rows count only the proxy's processes (nginx: master and workers summed). CPU is "
          "utime+stime from `/proc/PID/stat` over the run, divided by the requests (streams) answered "
          "(user space: utime; kernel: stime, which on loopback includes the receiving side's network "
          f"processing). Streaming: {meta.get('stream_events')} content events {meta.get('stream_pace_ms')} ms "
          "apart; time to first byte is measured to the first body chunk, time to first content event "
          "to the first `content_block_delta`. The mock upstream stamps each stream with the time the "
          "request reached it and the time it sent the first content event, which splits the time to first "
          "content into the request's way to the upstream and the event's way back (both on the one system "
          "clock; the mock's wait between them, quantised to its timer's millisecond ticks, drops out)."
          + stream_ramp_note(meta))
        w("")
    for b in bodies:
        w(f"### {body_label(b)}")
        w("")
        table_head()
        if has("ns_c1", b):
            row("ns_c1", b, "latency p50 (ms)", "p50_ms", 3)
            row("ns_c1", b, "latency p99 (ms)", "p99_ms", 3)
            diff_row("ns_c1", b, "added latency p50 over direct (ms)", "p50_ms", "direct")
            diff_row("ns_c1", b, "added latency p99 over direct (ms)", "p99_ms", "direct")
            row("ns_c1", b, "req/s", "rps", 0)
        if has("ns_c64", b):
            row("ns_c64", b, "req/s (2xx)", "rps", 0)
            row("ns_c64", b, "latency p50 (ms)", "p50_ms", 3)
            row("ns_c64", b, "latency p99 (ms)", "p99_ms", 3)
            row("ns_c64", b, "gateway CPU per request (µs)", "gw_cpu_us_per_req", 1, show_direct=False)
            row("ns_c64", b, "— of it in user space (µs)", "gw_user_us_per_req", 2, show_direct=False)
            row("ns_c64", b, "— of it in the kernel (µs)", "gw_sys_us_per_req", 2, show_direct=False)
            row("ns_c64", b, "gateway CPU use (cores)", "gw_cpu_share", 2, show_direct=False)
        if has("sse_c64", b):
            row("sse_c64", b, "completed streams/s", "sps", 1)
            row("sse_c64", b, "time to first byte p50 (ms)", "ttfb_p50_ms", 3)
            diff_row("sse_c64", b, "time to first byte p50 minus nginx (ms)", "ttfb_p50_ms", "nginx")
            row("sse_c64", b, "time to first byte p99 (ms)", "ttfb_p99_ms", 3)
            row("sse_c64", b, "time to first content event p50 (ms)", "ttfc_p50_ms", 3)
            diff_row("sse_c64", b, "time to first content event p50 minus nginx (ms)", "ttfc_p50_ms", "nginx")
            row("sse_c64", b, "time to first content event p99 (ms)", "ttfc_p99_ms", 3)
            if any(med(data, "sse_c64", b, t, "req_path_p50_ms") is not None for t in TARGETS):
                row("sse_c64", b, "— request's way to the upstream, p50 (ms)", "req_path_p50_ms", 3)
                row("sse_c64", b, "— first content event's way back, p50 (ms)", "first_relay_p50_ms", 3)
            row("sse_c64", b, "stream duration p50 (ms)", "total_p50_ms", 1)
            row("sse_c64", b, "largest gap between chunks, p50 (ms)", "gap_p50_ms", 2)
            row("sse_c64", b, "body chunks per stream", "frames", 1)
            row("sse_c64", b, "gateway CPU per stream (µs)", "gw_cpu_us_per_req", 1, show_direct=False)
        w("")

    # ---------------- CPU per request by body size ----------------
    for wl, title, unit in (("ns_c64", "CPU per request by body size", "request"),
                            ("sse_c64", "CPU per stream by body size", "stream")):
        if not any(has(wl, b) for b in bodies):
            continue
        w(f"## {title}")
        w("")
        w(f"Gateway CPU seconds (user + kernel) per {unit} in `{wl}`, in µs; in brackets the part in user space.")
        w("")
        w("| body | nginx (µs) | hyper (µs) | ccgate (µs) | ccgate/nginx | ccgate/hyper |")
        w("|---|---:|---:|---:|---:|---:|")
        for b in bodies:
            v = {t: med(data, wl, b, t, "gw_cpu_us_per_req") for t in GATEWAYS}
            u = {t: med(data, wl, b, t, "gw_user_us_per_req") for t in GATEWAYS}
            cells = [f"{fmt(v[t], 1)}" + (f" ({fmt(u[t], 1)})" if u[t] is not None else "") for t in GATEWAYS]
            w(f"| {body_label(b)} | " + " | ".join(cells)
              + f" | {ratio(v['ccgate'], v['nginx'])} | {ratio(v['ccgate'], v['hyper'])} |")
        w("")

    # ---------------- slow streams ----------------
    if counts:
        w("## Slow streams: memory per gateway")
        w("")
        w(f"Each round starts fresh gateways, reads their idle memory once startup has settled, then runs "
          f"N concurrent streams of {meta.get('slow_events')} events {meta.get('slow_pace_ms')} ms apart "
          "through each in turn while the memory is sampled every 50 ms; *peak* is the largest sample. "
          "Sums over the gateway's processes (nginx: master and workers). RSS counts pages shared between "
          "nginx's processes once per process; PSS splits them, so PSS is the fairer sum and the one the "
          "targets use. nginx preallocates its connection table (`worker_connections`, sized 2 × N + 1024 "
          "per round), so its idle memory grows with the round it is configured for. A gateway's slope is "
          "(its peak at the largest count it ran − its peak at the smallest) / the streams between them, "
          "and *slope / nginx* sets it beside nginx's over the same counts." if hi != lo else
          "(One stream count only: no slope.)")
        w("")
        if h2_ran:
            w("*ccgate-h2* is ccgate with `http2 = true` on both endpoints, over two more mocks that also "
              "speak h2c: a worker's streams share a few upstream connections, so it holds one descriptor "
              "per stream where an HTTP/1.1 proxy holds two. nginx proxies over HTTP/1.1 only, as in every "
              "other round.")
            w("")
        slow_gateways = GATEWAYS + slow_extra
        for key_idle, key_peak, label in (("idle_pss_kb", "peak_pss_kb", "PSS"),
                                          ("idle_rss_kb", "peak_rss_kb", "RSS")):
            head = ["gateway"]
            for c in counts:
                head += [f"{label} idle, {c:,}-stream config (MB)", f"{label} peak at {c:,} (MB)"]
            if hi != lo:
                head += ["slope (KB/stream)", "slope / nginx"]
            head += [f"peak at {c:,} / nginx" for c in counts]
            w("| " + " | ".join(head) + " |")
            w("|---|" + "---:|" * (len(head) - 1))
            for t in slow_gateways:
                cells = [t]
                for c in counts:
                    cells += [fmt(mb(med(data, "slow", c, t, key_idle)), 1),
                              fmt(mb(med(data, "slow", c, t, key_peak)), 1)]
                if hi != lo:
                    sp = span(t, key_peak)
                    cells += [fmt(slope(t, key_peak), 1) + (f" ({sp[0]:,} → {sp[1]:,})" if sp else ""),
                              ratio(slope(t, key_peak), slope("nginx", key_peak, sp))]
                cells += [ratio(med(data, "slow", c, t, key_peak), med(data, "slow", c, "nginx", key_peak))
                          for c in counts]
                w("| " + " | ".join(cells) + " |")
            w("")
        try:
            nofile = int(meta.get("nofile", "0"))
        except ValueError:
            nofile = 0
        short = [c for c in counts if nofile and nofile < 2 * c + 200]
        if short:
            w(f"**Open files:** this run's limit was {nofile:,} descriptors per process (hard limit "
              f"{meta.get('nofile_hard', '?')}). A proxy holds two per stream (the client's connection and "
              f"the upstream's) plus a few dozen of its own, so a single-process HTTP/1.1 gateway (ccgate, "
              f"hyper) cannot hold {', '.join(f'{c:,}' for c in short)} streams at once under it. "
              + ("It sits that round out" if all(med(data, "slow", c, "ccgate", "peak_pss_kb") is None for c in short)
                 else "Streams that failed or waited in that round are the limit's doing")
              + " (nginx spreads its connections over its worker processes, each with its own limit, "
              "and ccgate-h2 holds one descriptor per stream). Raise the hard limit to measure them there.")
            w("")
        stream_targets = TARGETS + slow_extra
        w("| streams | metric | " + " | ".join(stream_targets) + " |")
        w("|---:|---|" + "---:|" * len(stream_targets))
        for c in counts:
            for key, label, nd in (("ok", "streams completed", 0), ("failed", "streams failed", 0),
                                   ("ttfc_p50_ms", "time to first content event p50 (ms)", 0),
                                   ("total_p50_ms", "stream duration p50 (ms)", 0),
                                   ("total_max_ms", "stream duration max (ms)", 0)):
                vals = [med(data, "slow", c, t, key) for t in stream_targets]
                w(f"| {c:,} | {label} | " + " | ".join(fmt(v, nd) for v in vals) + " |")
        w("")
        w("A stream lasts "
          f"{int(meta.get('slow_events', 20)) * int(meta.get('slow_pace_ms', 200)):,} ms when nothing "
          "waits; longer durations mean the machine (or a gateway) fell behind.")
        w("")

    # ---------------- failover ----------------
    modes = [(m, lab) for m, lab in (("status500", "one mock answers 500"),
                                     ("refused", "one mock refuses connections"),
                                     ("killed", "one mock killed mid-run")) if has(f"failover_{m}")]
    if modes:
        w("## Failover (2k body)")
        w("")
        w("Fresh gateways over mock A and a broken upstream, concurrency "
          f"{meta.get('failover_concurrency')}, {meta.get('duration')} s per run, oha waiting for in-flight "
          "requests at the deadline. Requests answered 2xx (median over repeats); failed / all over all repeats.")
        w("")
        w("| broken upstream | nginx | ccgate | ccgate/nginx |")
        w("|---|---:|---:|---:|")
        for mode, label in modes:
            wl = f"failover_{mode}"
            cells = []
            for t in ("nginx", "ccgate"):
                s = med(data, wl, "", t, "success")
                f = sum(m.get("failed", 0) for m in data.get((wl, "", t), []))
                a = f + sum(m.get("ok", 0) for m in data.get((wl, "", t), []))
                cells.append((s, f"{fmt(None if s is None else s * 100, 3)}%; {f:,}/{a:,}"))
            w(f"| {label} | {cells[0][1]} | {cells[1][1]} | {ratio(cells[1][0], cells[0][0])} |")
        w("")

    # ---------------- earlier targets (issue #6) ----------------
    b0 = "2k" if "2k" in bodies else (bodies[0] if bodies else None)
    rows6 = []
    if b0:
        d50, c50, n50 = (med(data, "ns_c1", b0, t, "p50_ms") for t in ("direct", "ccgate", "nginx"))
        if d50 is not None and c50 is not None:
            extra = f" (nginx: +{n50 - d50:.3f} ms)" if n50 is not None else ""
            rows6.append(f"| added latency at c=1, p50 ≤ 0.3 ms | +{c50 - d50:.3f} ms{extra} | {yes(c50 - d50 <= 0.3)} |")
        dt, ct = med(data, "sse_c64", b0, "direct", "ttfb_p50_ms"), med(data, "sse_c64", b0, "ccgate", "ttfb_p50_ms")
        if dt is not None and ct is not None:
            rows6.append(f"| streaming: added time to first byte p50 ≤ 1 ms | +{ct - dt:.3f} ms | {yes(ct - dt <= 1.0)} |")
        ev, evd = med(data, "sse_c64", b0, "ccgate", "frames"), med(data, "sse_c64", b0, "direct", "frames")
        if ev is not None and evd is not None:
            rows6.append(f"| streaming: every event relayed as it arrives | {ev:.1f} body chunks per stream "
                         f"(direct {evd:.1f}) | {yes(ev >= evd - 0.5)} |")
    if lo is not None:
        pk = med(data, "slow", lo, "ccgate", "peak_rss_kb")
        if pk is not None:
            rows6.append(f"| peak RSS ≤ 30 MB with {lo:,} concurrent streams | {pk / 1024:.1f} MB | {yes(pk / 1024 <= 30)} |")
    idle = (med(data, "slow", lo, "ccgate", "idle_rss_kb") if lo is not None else None) \
        or med(data, "idle", "", "ccgate", "idle_rss_kb")
    if idle is not None:
        rows6.append(f"| idle RSS ≤ 15 MB | {idle / 1024:.1f} MB | {yes(idle / 1024 <= 15)} |")
    fo = [med(data, f"failover_{m}", "", "ccgate", "success") for m in ("status500", "refused", "killed")]
    fo = [x for x in fo if x is not None]
    if fo:
        fails = sum(m.get("failed", 0) for (wl, _, t), ms in data.items()
                    if wl.startswith("failover") and t == "ccgate" for m in ms)
        rows6.append(f"| failover: 100% of requests answered while one upstream is dead | "
                     f"{min(fo) * 100:.3f}% (worst median of the failover runs; {fails} failed requests in all) "
                     f"| {yes(fails == 0)} |")
    if rows6:
        w(f"## Earlier targets (issue #6){f', {b0} body' if b0 else ''}")
        w("")
        w("| target | measured | met? |")
        w("|---|---|---|")
        for r in rows6:
            w(r)
        w("")

    # ---------------- per repeat ----------------
    reps = sorted({m["rep"] for v in data.values() for m in v if m.get("rep")})
    w("## Per repeat (to judge the noise)")
    w("")
    w("| workload | at | metric | target | " + " | ".join(f"r{r}" for r in reps) + " |")
    w("|---|---|---|---|" + "---:|" * len(reps))
    series = [(wl, b, key, label, nd) for b in bodies
              for wl, key, label, nd in (("ns_c1", "p50_ms", "p50 ms", 3), ("ns_c64", "rps", "req/s", 0),
                                         ("ns_c64", "gw_cpu_us_per_req", "CPU µs/req", 1),
                                         ("sse_c64", "ttfc_p50_ms", "TTFC p50 ms", 3),
                                         ("sse_c64", "gw_cpu_us_per_req", "CPU µs/stream", 0))]
    series += [("slow", c, "peak_pss_kb", "peak PSS kB", 0) for c in counts]
    for wl, var, key, label, nd in series:
        for t in TARGETS:
            if t == "direct" and key in ("peak_pss_kb", "gw_cpu_us_per_req"):
                continue
            ms = {m["rep"]: m.get(key) for m in data.get((wl, var, t), [])}
            if not any(v is not None for v in ms.values()):
                continue
            at = f"{var:,} streams" if isinstance(var, int) else f"{var} body"
            w(f"| {wl} | {at} | {label} | {t} | " + " | ".join(fmt(ms.get(r), nd) for r in reps) + " |")
    w("")

    # ---------------- anything that went wrong ----------------
    problems = []
    for (wl, var, t), ms in sorted(data.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        for m in ms:
            if not isinstance(m, dict) or "rep" not in m or wl in ("idle", "final"):
                continue
            at = f"/{var}" if var != "" else ""
            if m.get("broken"):
                problems.append(f"- r{m['rep']} {wl}{at}/{t}: no usable output (see the logs)")
                continue
            bad = m.get("failed", 0)
            if bad and not wl.startswith("failover"):
                kinds = m.get("error_kinds") or {**{str(k): v for k, v in m.get("codes", {}).items()
                                                    if not 200 <= k < 300}, **m.get("errors", {})}
                problems.append(f"- r{m['rep']} {wl}{at}/{t}: {bad} failed ({kinds})")
            if wl.startswith("failover") and m.get("success", 1) < 1:
                kinds = {**{str(k): v for k, v in m.get("codes", {}).items() if not 200 <= k < 300},
                         **m.get("errors", {})}
                problems.append(f"- r{m['rep']} {wl}/{t}: {m['ok']} ok, {m['failed']} failed ({kinds})")
    w("## Failures seen in this run")
    w("")
    w("\n".join(problems) if problems else "None: every request and stream of every run succeeded.")
    w("")
    # The hand-written analysis (profile evidence, micro-benchmarks) is kept beside the script.
    analysis = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ANALYSIS.md")
    if os.path.exists(analysis):
        with open(analysis) as f:
            L.append(f.read())
    with open(out_md, "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
