#!/usr/bin/env python3
"""Turns the bench JSON reports into a Markdown table of ratios relative to NGINX.

Usage: table.py RESULTS_DIR CORES DURATION CONNECTIONS LOADGEN_THREADS
Each report carries "bench": {proxy, scenario, round, cpu_s, peak_rss_kb} added by run.sh; the idle
scenario's reports (idle.PROXY.json) carry "idle_bench" instead, and slowloris.json is the
`--slow` report of the slowloris scenario.
"""
import glob
import json
import os
import statistics
import sys

out_dir, cores, duration, connections, lg_threads = sys.argv[1:6]
runs = {}
for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
    with open(path) as f:
        r = json.load(f)
    b = r.get("bench")
    if not b:
        continue
    runs.setdefault((b["scenario"], b["proxy"]), []).append(r)


def agg(reports):
    rps = statistics.mean(r["throughput_rps"] for r in reports)
    p50 = statistics.mean(r["latency_ms"]["p50"] or 0 for r in reports)
    p99 = statistics.mean(r["latency_ms"]["p99"] or 0 for r in reports)
    responses = sum(r["requests"]["responses"] for r in reports)
    cpu = sum(r["bench"]["cpu_s"] for r in reports)
    cpu10k = cpu / responses * 10000 if responses else float("nan")
    rss = max(r["bench"]["peak_rss_kb"] for r in reports)
    failed = sum(r["requests"]["failed"] for r in reports)
    elapsed = statistics.mean(r["elapsed_s"] for r in reports)
    return {"rps": rps, "p50": p50, "p99": p99, "cpu10k": cpu10k, "rss": rss,
            "failed": failed, "responses": responses, "rounds": len(reports), "elapsed_s": elapsed}


def ratio(a, b):
    if not b or b != b or a != a:
        return "n/a"
    return f"{a / b:.2f}"


scenarios = []
for (scenario, _proxy) in runs:
    if scenario not in scenarios:
        scenarios.append(scenario)

print("# Meridian vs NGINX vs HAProxy (and bare Pingora) — ratios relative to NGINX\n")
print(f"Machine: {cores} cores shared by the load generator ({lg_threads} thread), the proxy under test "
      f"(1 worker) and the origin (1 thread). Closed loop: {connections} connections, {duration} per run; "
      "values are the mean over rounds (proxies interleaved). Ratios only: absolute numbers are in the "
      "JSON reports and are not claims.\n")
print("requests/s: higher is better; p50, p99, CPU per 10k requests and peak RSS: lower is better. "
      "`failed` is an absolute count of non-2xx/3xx answers and transport errors. `pingora` is a bare "
      "Pingora `ProxyHttp` to the same origin (fixed peer, nothing else): the framework's ceiling.\n")
print("| scenario | proxy | requests/s | p50 | p99 | CPU s / 10k req | peak RSS | failed | req/s vs better of NGINX/HAProxy |")
print("|---|---|---|---|---|---|---|---|---|")
for scenario in scenarios:
    base = runs.get((scenario, "nginx"))
    if not base:
        continue
    n = agg(base)
    results = {p: agg(runs[(scenario, p)]) for p in ("nginx", "haproxy", "meridian", "meridian-base", "pingora")
               if (scenario, p) in runs}
    best_other = max((v["rps"] for p, v in results.items() if p in ("nginx", "haproxy")), default=None)
    for proxy, a in results.items():
        vs_best = ratio(a["rps"], best_other) if proxy not in ("nginx", "haproxy") and best_other else ""
        print(f"| {scenario} | {proxy} | {ratio(a['rps'], n['rps'])} | {ratio(a['p50'], n['p50'])} | "
              f"{ratio(a['p99'], n['p99'])} | {ratio(a['cpu10k'], n['cpu10k'])} | {ratio(a['rss'], n['rss'])} | "
              f"{a['failed']} | {vs_best} |")


def budget(reports):
    """CPU per answered request of the three processes that share the machine's cores, in seconds:
    the proxy (user, system), the origin and the generator; None for reports written before run.sh
    recorded them."""
    b0 = reports[0]["bench"]
    if "cpu_user_s" not in b0 or not reports[0].get("process_cpu_s"):
        return None
    responses = sum(r["requests"]["responses"] for r in reports)
    if not responses:
        return None
    total = lambda f: sum(f(r) for r in reports) / responses
    out = {
        "user": total(lambda r: r["bench"]["cpu_user_s"]),
        "system": total(lambda r: r["bench"]["cpu_system_s"]),
        "origin": total(lambda r: r["bench"]["origin_cpu_user_s"] + r["bench"]["origin_cpu_system_s"]),
        "generator": total(lambda r: r["process_cpu_s"]["user"] + r["process_cpu_s"]["system"]),
        "busy": statistics.mean(
            (r["bench"]["cpu_s"] + r["bench"]["origin_cpu_user_s"] + r["bench"]["origin_cpu_system_s"]
             + r["process_cpu_s"]["user"] + r["process_cpu_s"]["system"]) / (int(cores) * r["elapsed_s"])
            for r in reports),
    }
    out["machine"] = out["user"] + out["system"] + out["origin"] + out["generator"]
    return out


closed = [s for s in scenarios if s in ("get-1k", "get-64k", "post-16k") and (s, "nginx") in runs]
if closed and budget(runs[(closed[0], "nginx")]):
    print("\nWhere the machine's CPU goes: per answered request, the proxy's user and system time, the "
          "origin's and the generator's CPU, and their sum (the machine), each relative to the same "
          "scenario's NGINX run. In a closed loop on shared cores the machine's CPU per request bounds "
          "requests/s, so a proxy's own CPU is only part of what it is measured by. `proxy share`: the "
          "proxy's part of the machine's CPU per request. `busy`: CPU used by the three / (cores x "
          "duration). `no proxy user time`: requests/s relative to NGINX that a proxy doing this one's "
          "system work and none of its user-space work would reach if the machine's CPU is the bound "
          "(NGINX's machine CPU / (this machine CPU - this proxy's user time)).\n")
    print("| scenario | proxy | proxy user | proxy system | origin | generator | machine | proxy share | busy | no proxy user time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scenario in closed:
        n = budget(runs[(scenario, "nginx")])
        if not n:
            continue
        for proxy in ("nginx", "haproxy", "meridian", "meridian-base", "pingora"):
            if (scenario, proxy) not in runs:
                continue
            a = budget(runs[(scenario, proxy)])
            if not a:
                continue
            share = (a["user"] + a["system"]) / a["machine"]
            print(f"| {scenario} | {proxy} | {ratio(a['user'], n['user'])} | {ratio(a['system'], n['system'])} | "
                  f"{ratio(a['origin'], n['origin'])} | {ratio(a['generator'], n['generator'])} | "
                  f"{ratio(a['machine'], n['machine'])} | {share:.0%} | {a['busy']:.0%} | "
                  f"{ratio(n['machine'], a['machine'] - a['user'])} |")

if ("cache-hit", "nginx-cache") in runs and ("cache-hit", "meridian-cache") in runs:
    c = agg(runs[("cache-hit", "nginx-cache")])
    m = agg(runs[("cache-hit", "meridian-cache")])
    hits = sum(r.get("cache", {}).get("hit", 0) for r in runs[("cache-hit", "meridian-cache")])
    print("\nCache hit, Meridian (cache-enabled route) relative to NGINX proxy_cache, same origin and load:\n")
    print("| scenario | proxy | requests/s | p50 | p99 | CPU s / 10k req | peak RSS | failed |")
    print("|---|---|---|---|---|---|---|---|")
    cached = [("nginx-cache", c), ("meridian-cache", m)]
    if ("cache-hit", "meridian-base-cache") in runs:
        cached.append(("meridian-base-cache", agg(runs[("cache-hit", "meridian-base-cache")])))
    for proxy, a in cached:
        print(f"| cache-hit | {proxy} | {ratio(a['rps'], c['rps'])} | {ratio(a['p50'], c['p50'])} | "
              f"{ratio(a['p99'], c['p99'])} | {ratio(a['cpu10k'], c['cpu10k'])} | {ratio(a['rss'], c['rss'])} | "
              f"{a['failed']} |")
    print(f"\nMeridian answers with `x-meridian-cache: hit`: {hits} of {m['responses']}.")
tls_rows = [s for s in ("tls-h1", "tls-h2", "quic-h3", "handshake-h1", "handshake-h2", "handshake-h3")
            if (s, "meridian") in runs]
if tls_rows and ("get-1k", "meridian") in runs:
    plain = agg(runs[("get-1k", "meridian")])
    print("\nMeridian only, GET 1 KiB over TLS and QUIC, relative to Meridian's plain-text h1 `get-1k` above "
          "(same origin, same run). `tls-*`/`quic-h3`: kept-alive connections (h1: 64 connections; h2/h3: "
          "8 connections x 8 streams). `handshake-*`: every request on a new connection (16 at a time), so "
          "requests/s is handshakes/s.\n")
    print("| scenario | requests/s | p50 | p99 | CPU s / 10k req | connections opened | failed |")
    print("|---|---|---|---|---|---|---|")
    for s in tls_rows:
        a = agg(runs[(s, "meridian")])
        opened = sum(r.get("connections_opened", 0) or 0 for r in runs[(s, "meridian")])
        print(f"| {s} | {ratio(a['rps'], plain['rps'])} | {ratio(a['p50'], plain['p50'])} | "
              f"{ratio(a['p99'], plain['p99'])} | {ratio(a['cpu10k'], plain['cpu10k'])} | {opened} | "
              f"{a['failed']} |")

idle = {}
for path in sorted(glob.glob(os.path.join(out_dir, "idle.*.json"))):
    with open(path) as f:
        r = json.load(f)
    if "idle_bench" in r:
        idle[r["idle_bench"]["proxy"]] = r
if idle:
    n = max(r["connections"] for r in idle.values())
    print(f"\nIdle keep-alive connections: {n} connections, each answered once (GET 1 KiB) and then held "
          "idle; resident memory (VmRSS) of the proxy process (NGINX: its worker) at start, just before "
          "they opened and with all of them open. KiB per connection = (with - before) / connections "
          "open (HAProxy may hold fewer: its maxconn needs two descriptors each within the open-file limit). "
          "Absolute KiB: memory, not speed, so it does not depend on the machine's load.\n")
    print("| proxy | open | RSS at start (KiB) | RSS before (KiB) | RSS with idle (KiB) | KiB per idle connection | failed |")
    print("|---|---|---|---|---|---|---|")
    for proxy in ("nginx", "haproxy", "meridian", "meridian-base", "pingora"):
        r = idle.get(proxy)
        if not r:
            continue
        b = r["idle_bench"]
        held = r["still_open_at_end"]
        per = (b["with_rss_kb"] - b["before_rss_kb"]) / held if held else float("nan")
        failed = r["connect_failed"] + r["request_failed"] + r["closed_while_held"]
        print(f"| {proxy} | {held} | {b['start_rss_kb']} | {b['before_rss_kb']} | {b['with_rss_kb']} | "
              f"{per:.2f} | {failed} |")

slow_path = os.path.join(out_dir, "slowloris.json")
if os.path.exists(slow_path):
    with open(slow_path) as f:
        slow = json.load(f)
    ttc = slow["time_to_close_ms"]

    def secs(ms):
        return "-" if ms is None else f"{ms / 1000:.2f}"

    answers = " ".join(f"{k}={v}" for k, v in sorted(slow["answers"].items())) or "-"
    print(f"\nSlowloris against Meridian (client_header_timeout {slow.get('header_timeout', '?')}): "
          f"{slow['connections']} connections sending a byte every {slow['interval_s']:g} s of a head that "
          f"never ends, given up after {slow['cap_s']:g} s. Time to close counts from each connect.\n")
    print("| opened | closed by Meridian | still open at cap | answered | time to close p50 / p99 / max (s) |")
    print("|---|---|---|---|---|")
    print(f"| {slow['opened']} | {slow['closed_by_server']} | {slow['still_open_at_cap']} | {answers} | "
          f"{secs(ttc['p50'])} / {secs(ttc['p99'])} / {secs(ttc['max'])} |")
    if ("slowloris-unloaded", "meridian") in runs and ("slowloris-loaded", "meridian") in runs:
        u = agg(runs[("slowloris-unloaded", "meridian")])
        lo = agg(runs[("slowloris-loaded", "meridian")])
        print(f"\n{connections} normal clients running get-1k beside them (for "
              f"{lo['elapsed_s']:.0f} s, past the header timeout), relative to the same run without them "
              "right before:\n")
        print("| run | requests/s | p50 | p99 | failed |")
        print("|---|---|---|---|---|")
        print(f"| unloaded | 1.00 | 1.00 | 1.00 | {u['failed']} |")
        print(f"| with slowloris | {ratio(lo['rps'], u['rps'])} | {ratio(lo['p50'], u['p50'])} | "
              f"{ratio(lo['p99'], u['p99'])} | {lo['failed']} |")
