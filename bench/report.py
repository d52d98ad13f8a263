#!/usr/bin/env python3
"""Turns one bench/run.sh results directory into BENCHMARKS.md.

    python3 bench/report.py bench/results/latest BENCHMARKS.md

Reads RESULTS/runs.jsonl (one line per measured run), the raw outputs it names (oha JSON, sse-load
JSON) and RESULTS/meta.env; takes medians over repeats and writes the Markdown report.
"""

import json
import os
import statistics
import sys

TARGETS = ["direct", "nginx", "hyper", "ccgate"]


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
        "total_p50_ms": (d["total_ms"] or {}).get("p50") or 0,
        "total_max_ms": (d["total_ms"] or {}).get("max") or 0,
        "gap_p50_ms": (d["max_gap_ms"] or {}).get("p50") or 0,
        "events": d.get("events_per_stream", 0),
        "frames": d.get("frames_per_stream", 0),
    }
    if "gw_cpu_s" in run and d["completed"]:
        m["gw_cpu_us_per_req"] = run["gw_cpu_s"] / d["completed"] * 1e6
        m["gw_cpu_share"] = run["gw_cpu_s"] / max(1e-9, run["wall_s"])
    for k in ("idle_rss_kb", "peak_rss_kb", "hwm_rss_kb", "idle_pss_kb", "peak_pss_kb"):
        if k in run:
            m[k] = run[k]
    return m


def collect(results, runs):
    """{(workload, target): [metrics per repeat]}"""
    out = {}
    for r in runs:
        wl, tgt = r["workload"], r["target"]
        if wl in ("idle", "final"):
            out.setdefault((wl, tgt), []).append(r)
            continue
        d = read_raw(results, r["raw"])
        m = oha_metrics(d, r) if r["tool"] == "oha" else sse_metrics(d, r)
        m["rep"] = r["rep"]
        out.setdefault((wl, tgt), []).append(m)
    return out


def med(data, wl, tgt, key):
    vals = [m[key] for m in data.get((wl, tgt), []) if key in m and m[key] is not None]
    return statistics.median(vals) if vals else None


def spread(data, wl, tgt, key):
    vals = [m[key] for m in data.get((wl, tgt), []) if key in m and m[key] is not None]
    return (min(vals), max(vals)) if vals else None


def fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def main():
    results, out_md = sys.argv[1], sys.argv[2]
    results = os.path.realpath(results)
    runs, meta = load(results)
    data = collect(results, runs)
    L = []
    w = L.append

    w("# Benchmarks: ccgate beside nginx and a direct connection")
    w("")
    w("Produced by `bench/run.sh` (issue #6). **Ratios are what count**: the machine is shared and")
    w("noisy, and the load generator, the proxies and both mock upstreams all share its "
      f"{meta.get('nproc', '?')} cores (nothing is pinned), so absolute numbers move from run to run.")
    w("Targets alternate (direct / nginx / hyper / ccgate, order rotated every repeat) so noise hits all alike;")
    w(f"every number below is the **median over {meta.get('repeats')} repeats**.")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| command | `{meta.get('command')}` |")
    w(f"| date | {meta.get('date')} |")
    w(f"| machine | {meta.get('nproc')} × {meta.get('cpu')}, {meta.get('mem')}, Linux {meta.get('kernel')} |")
    w(f"| load average at the end | {meta.get('loadavg')} |")
    w(f"| ccgate | {meta.get('ccgate')} (release), 2 endpoints of equal priority; log level: {meta.get('ccgate_log')} |")
    w(f"| nginx | {meta.get('nginx')}, `worker_processes auto`, upstream keep-alive, `proxy_buffering off`, "
      "`proxy_next_upstream error timeout http_5xx non_idempotent` |")
    w(f"| load generators | {meta.get('oha')} (non-streaming), `sse-load` from bench/mock-upstream (streaming) |")
    w(f"| timed runs | {meta.get('duration')} s each; request body {meta.get('body_bytes')} bytes |")
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

    # ---------------- main table ----------------
    w("## Results")
    w("")
    w("| workload | metric | direct | nginx | hyper | ccgate | ccgate/direct | ccgate/nginx | ccgate/hyper |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def row(wl, label, key, nd=2, show_direct=True, scale=1.0):
        vals = [med(data, wl, t, key) for t in TARGETS]
        vals = [None if v is None else v * scale for v in vals]
        d, n, h, c = vals
        if not show_direct:
            d = None
        w(f"| {wl} | {label} | {fmt(d, nd)} | {fmt(n, nd)} | {fmt(h, nd)} | {fmt(c, nd)} "
          f"| {ratio(c, d)} | {ratio(c, n)} | {ratio(c, h)} |")

    if any(k[0] == "ns_c1" for k in data):
        row("ns_c1", "latency p50 (ms)", "p50_ms", 3)
        row("ns_c1", "latency p99 (ms)", "p99_ms", 3)
        row("ns_c1", "req/s", "rps", 0)
    if any(k[0] == "ns_c64" for k in data):
        row("ns_c64", "req/s (2xx)", "rps", 0)
        row("ns_c64", "latency p50 (ms)", "p50_ms", 3)
        row("ns_c64", "latency p99 (ms)", "p99_ms", 3)
        row("ns_c64", "gateway CPU per request (µs)", "gw_cpu_us_per_req", 1, show_direct=False)
        row("ns_c64", "— of it in user space (µs)", "gw_user_us_per_req", 2, show_direct=False)
        row("ns_c64", "— of it in the kernel (µs)", "gw_sys_us_per_req", 2, show_direct=False)
        row("ns_c64", "gateway CPU use (cores)", "gw_cpu_share", 2, show_direct=False)
    if any(k[0] == "sse_c64" for k in data):
        row("sse_c64", "completed streams/s", "sps", 1)
        row("sse_c64", "time to first byte p50 (ms)", "ttfb_p50_ms", 3)
        row("sse_c64", "time to first byte p99 (ms)", "ttfb_p99_ms", 3)
        row("sse_c64", "time to first content event p50 (ms)", "ttfc_p50_ms", 3)
        row("sse_c64", "time to first content event p99 (ms)", "ttfc_p99_ms", 3)
        row("sse_c64", "stream duration p50 (ms)", "total_p50_ms", 1)
        row("sse_c64", "largest gap between chunks, p50 (ms)", "gap_p50_ms", 2)
        row("sse_c64", "body chunks per stream", "frames", 1)
        row("sse_c64", "gateway CPU per stream (µs)", "gw_cpu_us_per_req", 1, show_direct=False)
    if any(k[0] == "slow" for k in data):
        row("slow", "streams completed", "ok", 0)
        row("slow", "stream duration p50 (ms)", "total_p50_ms", 0)
        row("slow", "stream duration max (ms)", "total_max_ms", 0)
        row("slow", "gateway idle RSS (MB)", "idle_rss_kb", 1, show_direct=False, scale=1 / 1024)
        row("slow", "gateway peak RSS, sampled (MB)", "peak_rss_kb", 1, show_direct=False, scale=1 / 1024)
        row("slow", "gateway VmHWM (MB)", "hwm_rss_kb", 1, show_direct=False, scale=1 / 1024)
        row("slow", "gateway idle PSS (MB)", "idle_pss_kb", 1, show_direct=False, scale=1 / 1024)
        row("slow", "gateway peak PSS, sampled (MB)", "peak_pss_kb", 1, show_direct=False, scale=1 / 1024)
    for mode, label in (("status500", "one mock answers 500"), ("refused", "one mock refuses connections"),
                        ("killed", "one mock killed mid-run")):
        wl = f"failover_{mode}"
        if any(k[0] == wl for k in data):
            n = med(data, wl, "nginx", "success")
            c = med(data, wl, "ccgate", "success")
            nf = sum(m.get("failed", 0) for m in data.get((wl, "nginx"), []))
            cf = sum(m.get("failed", 0) for m in data.get((wl, "ccgate"), []))
            nt = nf + sum(m.get("ok", 0) for m in data.get((wl, "nginx"), []))
            ct = cf + sum(m.get("ok", 0) for m in data.get((wl, "ccgate"), []))
            w(f"| failover | {label}: requests answered 2xx (%); failed/all over all repeats | — "
              f"| {fmt(None if n is None else n * 100, 3)}; {nf}/{nt} "
              f"| — | {fmt(None if c is None else c * 100, 3)}; {cf}/{ct} | — | {ratio(c, n)} | — |")
    w("")
    w("Rows marked *gateway* count only the proxy's processes (nginx: master and workers summed; its "
      "VmHWM is the sum of per-process peaks; RSS sums count pages shared between nginx's processes "
      "once per process, PSS splits them, so for nginx PSS is the fairer sum). CPU is utime+stime from `/proc/PID/stat` over the run "
      "(user space: utime; kernel: stime, which on loopback includes the receiving side's network processing). "
      "The *slow* workload starts fresh gateways: idle RSS is read 1 s after startup, peak RSS is "
      f"sampled every 50 ms while {meta.get('slow_streams')} streams of {meta.get('slow_events')} events "
      f"{meta.get('slow_pace_ms')} ms apart run at once. Streaming: {meta.get('stream_events')} content "
      f"events {meta.get('stream_pace_ms')} ms apart; time to first byte is measured to the first body "
      "chunk. Failover runs use fresh gateways over mock A and a broken upstream, concurrency "
      f"{meta.get('failover_concurrency')}, with oha waiting for in-flight requests at the deadline.")
    w("")

    # ---------------- targets ----------------
    w("## Targets of issue #6")
    w("")
    w("| target | measured | met? |")
    w("|---|---|---|")

    def yes(b):
        return "—" if b is None else ("yes" if b else "**no**")

    c64c, c64n = med(data, "ns_c64", "ccgate", "rps"), med(data, "ns_c64", "nginx", "rps")
    if c64c is not None and c64n is not None:
        w(f"| non-streaming throughput at c=64 ≥ 1.0× nginx | {c64c / c64n:.2f}× | {yes(c64c >= c64n)} |")
    d50, c50 = med(data, "ns_c1", "direct", "p50_ms"), med(data, "ns_c1", "ccgate", "p50_ms")
    n99, c99 = med(data, "ns_c1", "nginx", "p99_ms"), med(data, "ns_c1", "ccgate", "p99_ms")
    if d50 is not None and c50 is not None:
        n50 = med(data, "ns_c1", "nginx", "p50_ms")
        extra = f" (nginx: +{n50 - d50:.3f} ms)" if n50 is not None else ""
        w(f"| added latency at c=1, p50 ≤ 0.3 ms | +{c50 - d50:.3f} ms{extra} | {yes(c50 - d50 <= 0.3)} |")
    if n99 is not None and c99 is not None:
        w(f"| p99 at c=1 no worse than nginx | {c99:.3f} ms vs {n99:.3f} ms | {yes(c99 <= n99)} |")
    dt, ct = med(data, "sse_c64", "direct", "ttfb_p50_ms"), med(data, "sse_c64", "ccgate", "ttfb_p50_ms")
    if dt is not None and ct is not None:
        w(f"| streaming: added time to first byte p50 ≤ 1 ms | +{ct - dt:.3f} ms | {yes(ct - dt <= 1.0)} |")
    dc, cc = med(data, "sse_c64", "direct", "ttfc_p50_ms"), med(data, "sse_c64", "ccgate", "ttfc_p50_ms")
    if dc is not None and cc is not None:
        w(f"| (streaming: added time to first *content* event p50, for comparison) | +{cc - dc:.3f} ms "
          f"| {yes(cc - dc <= 1.0)} |")
    ev = med(data, "sse_c64", "ccgate", "frames")
    evd = med(data, "sse_c64", "direct", "frames")
    if ev is not None and evd is not None:
        w(f"| streaming: every event relayed as it arrives | {ev:.1f} body chunks per stream "
          f"(direct {evd:.1f}) | {yes(ev >= evd - 0.5)} |")
    pk = med(data, "slow", "ccgate", "peak_rss_kb")
    if pk is not None:
        w(f"| peak RSS ≤ 30 MB with {meta.get('slow_streams')} concurrent streams | {pk / 1024:.1f} MB "
          f"| {yes(pk / 1024 <= 30)} |")
    idle = med(data, "slow", "ccgate", "idle_rss_kb") or med(data, "idle", "ccgate", "idle_rss_kb")
    if idle is not None:
        w(f"| idle RSS ≤ 15 MB | {idle / 1024:.1f} MB | {yes(idle / 1024 <= 15)} |")
    fo = [med(data, f"failover_{m}", "ccgate", "success") for m in ("status500", "refused", "killed")]
    fo = [x for x in fo if x is not None]
    if fo:
        fails = sum(m.get("failed", 0) for (wl, t), ms in data.items()
                    if wl.startswith("failover") and t == "ccgate" for m in ms)
        w(f"| failover: 100% of requests answered while one upstream is dead | "
          f"{min(fo) * 100:.3f}% (worst median of the failover runs; {fails} failed requests in all) "
          f"| {yes(fails == 0)} |")
    w("")

    # ---------------- per repeat ----------------
    w("## Per repeat (to judge the noise)")
    w("")
    w("| workload | metric | target | " + " | ".join(
        f"r{r}" for r in sorted({m['rep'] for v in data.values() for m in v if 'rep' in m and m['rep']})) + " |")
    reps = sorted({m['rep'] for v in data.values() for m in v if 'rep' in m and m['rep']})
    w("|---|---|---|" + "---:|" * len(reps))
    for wl, key, label, nd in (("ns_c1", "p50_ms", "p50 ms", 3), ("ns_c64", "rps", "req/s", 0),
                               ("sse_c64", "sps", "streams/s", 1), ("sse_c64", "ttfb_p50_ms", "TTFB p50 ms", 3),
                               ("slow", "peak_rss_kb", "peak RSS kB", 0)):
        for t in TARGETS:
            ms = {m["rep"]: m.get(key) for m in data.get((wl, t), [])}
            if not any(v is not None for v in ms.values()):
                continue
            if key == "peak_rss_kb" and t == "direct":
                continue
            w(f"| {wl} | {label} | {t} | " + " | ".join(fmt(ms.get(r), nd) for r in reps) + " |")
    w("")

    # ---------------- anything that went wrong ----------------
    problems = []
    for (wl, t), ms in sorted(data.items()):
        for m in ms:
            if not isinstance(m, dict) or "rep" not in m or wl in ("idle", "final"):
                continue
            if m.get("broken"):
                problems.append(f"- r{m['rep']} {wl}/{t}: no usable output (see the logs)")
                continue
            bad = m.get("failed", 0)
            if bad and not wl.startswith("failover"):
                kinds = m.get("error_kinds") or {**{str(k): v for k, v in m.get("codes", {}).items()
                                                    if not 200 <= k < 300}, **m.get("errors", {})}
                problems.append(f"- r{m['rep']} {wl}/{t}: {bad} failed ({kinds})")
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
