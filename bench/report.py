#!/usr/bin/env python3
"""Summary, Markdown and SVG of a `make bench` run.

    python3 bench/report.py docs/bench/results.json   # re-render docs/ from a results file

Ratios are to A (bare Envoy) measured in the same round, then the median over rounds; absolute
numbers are medians over rounds.
"""
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUPS = ["A", "B", "C", "D", "E"]
ALL = SETUPS + ["N", "V"]  # N, V: breakdown setups (handshakes and the 1-stream flood only)
COLORS = {"B": "#8c8c8c", "C": "#e0a030", "D": "#2a7ab9", "E": "#7fb8e0"}

# (key, label, getter from one round's result, higher_is_better)
ROUND_METRICS = [
    ("hs_rps", "handshakes/s (32 conns)", lambda r: r["hs"]["rps"], True),
    ("hs_p50_us", "handshake p50 under load (µs)", lambda r: r["hs"]["p50_us"], False),
    ("hs_p99_us", "handshake p99 under load (µs)", lambda r: r["hs"]["p99_us"], False),
    ("lat_p50_us", "handshake p50, 1 conn (µs)", lambda r: r["lat"]["p50_us"], False),
    ("lat_p99_us", "handshake p99, 1 conn (µs)", lambda r: r["lat"]["p99_us"], False),
    ("hs_cpu_us", "Envoy CPU per handshake (µs)", lambda r: r["hs"]["envoy_cpu_us"], False),
    ("hs_auth_cpu_us", "auth service CPU per handshake (µs)", lambda r: r["hs"]["auth_cpu_us"], False),
    ("flood1_eps", "events/s, 1 stream", lambda r: r["flood1"]["eps"], True),
    ("floodN_eps", "events/s, many streams", lambda r: r["floodN"]["eps"], True),
    ("flood1_cpu_ns", "Envoy CPU per event, 1 stream (ns)", lambda r: r["flood1"]["envoy_cpu_ns_per_event"], False),
    ("paced_cpu_us", "Envoy CPU per event, paced (µs)", lambda r: r["paced"]["envoy_cpu_us_per_event"], False),
    ("paced_p50_us", "per-event latency p50 (µs)", lambda r: r["paced"]["p50_us"], False),
    ("paced_p99_us", "per-event latency p99 (µs)", lambda r: r["paced"]["p99_us"], False),
]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(res):
    s = {"abs": {}, "ratio": {}, "added_us": {}, "d_over_b": {}}
    rounds = res.get("rounds") or []
    by = {}
    for r in rounds:
        by.setdefault(r["round"], {})[r["setup"]] = r
    def val(rr, x, get):
        try:
            return get(rr[x]) if x in rr else None
        except KeyError:  # a breakdown setup lacks this measurement
            return None

    for key, _, get, _ in ROUND_METRICS:
        s["abs"][key] = {x: med([val(rr, x, get) for rr in by.values()]) for x in ALL}
        s["ratio"][key] = {x: med([val(rr, x, get) / val(rr, "A", get) for rr in by.values()
                                   if val(rr, x, get) is not None and val(rr, "A", get)]) for x in ALL}
        s["added_us"][key] = {x: med([val(rr, x, get) - val(rr, "A", get) for rr in by.values()
                                      if val(rr, x, get) is not None and val(rr, "A", get) is not None])
                              for x in ALL}
    # breakdown: medians of per-round steps A → N → V → D → E
    steps = [("N", "A"), ("V", "N"), ("D", "V"), ("E", "D")]
    s["steps"] = {}
    for key in ("hs_cpu_us", "flood1_cpu_ns", "hs_rps"):
        get = dict((k, g) for k, _, g, _ in ROUND_METRICS)[key]
        s["steps"][key] = {f"{x}-{y}": med([val(rr, x, get) - val(rr, y, get) for rr in by.values()
                                            if val(rr, x, get) is not None and val(rr, y, get) is not None])
                           for x, y in steps}
    s["d_over_b"]["hs_rps"] = med([rr["D"]["hs"]["rps"] / rr["B"]["hs"]["rps"] for rr in by.values()
                                   if "D" in rr and "B" in rr and rr["B"]["hs"]["rps"]])
    # D against jwt_authn (C) and against the no-op wasm filter (N), per round
    for other in ("C", "N"):
        s[f"d_over_{other.lower()}"] = {
            "hs_rps": med([rr["D"]["hs"]["rps"] / rr[other]["hs"]["rps"] for rr in by.values()
                           if "D" in rr and other in rr and rr[other]["hs"]["rps"]]),
            "hs_cpu_us": med([rr["D"]["hs"]["envoy_cpu_us"] / rr[other]["hs"]["envoy_cpu_us"] for rr in by.values()
                              if "D" in rr and other in rr and rr[other]["hs"]["envoy_cpu_us"]])}
    mem = res.get("memory") or {}
    if mem:
        s["abs"]["mem_kb"] = {x: mem[x]["per_stream_kb"] for x in SETUPS if x in mem}
        a = mem.get("A", {}).get("per_stream_kb")
        s["ratio"]["mem_kb"] = {x: (mem[x]["per_stream_kb"] / a if a else None) for x in SETUPS if x in mem}
    herd = res.get("herd") or {}
    if herd:
        s["abs"]["herd_calls"] = {x: max(h["auth_calls"] for h in herd[x]) for x in SETUPS if herd.get(x)}
        s["abs"]["herd_ms"] = {x: med([h["all_done_ms"] for h in herd[x]]) for x in SETUPS if herd.get(x)}
    cache = res.get("cache")
    if cache:
        pts = cache["points"]
        size = cache["cache_max_size"]
        past = [p for p in pts if p["tokens"] >= 2 * size]
        if len(past) >= 2:
            growth_kb = past[-1]["rss_kb"] - past[0]["rss_kb"]
            s["cache_growth"] = {"from_tokens": past[0]["tokens"], "to_tokens": past[-1]["tokens"],
                                 "growth_kb": growth_kb, "growth_pct": 100.0 * growth_kb / past[0]["rss_kb"]}
    s["targets"] = targets(res, s)
    return s


def _fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}"


def targets(res, s):
    out = []
    r, ab, add = s["ratio"], s["abs"], s["added_us"]

    def t(name, value, ok, detail=""):
        out.append({"target": name, "measured": value, "met": ok, "detail": detail})

    if res.get("rounds"):
        dc = s.get("d_over_c", {}).get("hs_rps")
        t("D handshakes/s ≥ 1.0 × C (jwt_authn, local RS256)", f"{_fmt_ratio(dc)} × C", dc is not None and dc >= 1.0)
        dn = s.get("d_over_n", {}).get("hs_rps")
        if dn is not None:
            t("D handshakes/s ≥ 0.95 × N (the no-op wasm filter)", f"{_fmt_ratio(dn)} × N "
              f"(Envoy CPU per handshake {_fmt_ratio(s['d_over_n']['hs_cpu_us'])} × N)", dn >= 0.95)
        d = r["hs_rps"]["D"]
        t("D handshakes/s ≥ 0.93 × A", f"{_fmt_ratio(d)} × A", d is not None and d >= 0.93)
        db = s["d_over_b"]["hs_rps"]
        t("D handshakes/s ≥ 1.6 × B", f"{_fmt_ratio(db)} × B", db is not None and db >= 1.6)
        a50 = add["lat_p50_us"]["D"]
        t("D added handshake p50 ≤ 0.1 ms over A (1 conn)", f"{a50:+.0f} µs", a50 is not None and a50 <= 100)
        f1, fn = r["flood1_eps"]["D"], r["floodN_eps"]["D"]
        t("D events/s ≥ 0.95 × A (1 stream)", f"{_fmt_ratio(f1)} × A", f1 is not None and f1 >= 0.95)
        t("D events/s ≥ 0.95 × A (many streams)", f"{_fmt_ratio(fn)} × A", fn is not None and fn >= 0.95)
        pc = r["paced_cpu_us"]["D"]
        t("D Envoy CPU per paced event ≤ 1.15 × A (one chunk per event, heartbeats on)", f"{_fmt_ratio(pc)} × A",
          pc is not None and pc <= 1.15)
        p50, p99 = add["paced_p50_us"]["D"], add["paced_p99_us"]["D"]
        t("D added per-event latency ≤ 0.15 ms p50 (heartbeats on)", f"{p50:+.0f} µs", p50 <= 150)
        t("D added per-event latency ≤ 0.5 ms p99 (heartbeats on)", f"{p99:+.0f} µs", p99 <= 500)
    sc = res.get("scale")
    if sc and "A" in sc and "D" in sc:
        a, d = sc["A"], sc["D"]
        cr = d["cpu_pct"] / a["cpu_pct"] if a["cpu_pct"] else None
        t(f"{d['streams']:,} open streams, mixed, heartbeat 1 s: D Envoy CPU ≤ 1.3 × A",
          f"{_fmt_ratio(cr)} × A ({d['cpu_pct']:.1f} % vs {a['cpu_pct']:.1f} %)", cr is not None and cr <= 1.3)
        mr = d["per_stream_kb"] / a["per_stream_kb"] if a["per_stream_kb"] else None
        t(f"{d['streams']:,} open streams: D RSS per stream ≤ 1.2 × A",
          f"{_fmt_ratio(mr)} × A ({d['per_stream_kb']:.1f} vs {a['per_stream_kb']:.1f} KiB)", mr is not None and mr <= 1.2)
    if "mem_kb" in r and r["mem_kb"].get("D") is not None:
        m = r["mem_kb"]["D"]
        t(f"{res['memory']['D']['streams']:,} quiet streams: D RSS per stream ≤ 1.2 × A",
          f"{m:.2f} × A ({ab['mem_kb']['D']:.1f} vs {ab['mem_kb']['A']:.1f} KiB)", m <= 1.2)
    cl = res.get("cliff")
    if cl and cl.get("ratio") is not None:
        t(f"no cliff near expiry ({cl['streams']:,} streams): CPU inside the last challenge + 5 s ≤ 1.1 × outside",
          f"{cl['ratio']:.2f} × ({cl['cpu_inside_pct']:.1f} % vs {cl['cpu_outside_pct']:.1f} %)", cl["ratio"] <= 1.1)
    if "cache_growth" in s:
        g = s["cache_growth"]
        t("cache memory flat past cache_max_size",
          f"{g['growth_kb'] / 1024:+.1f} MiB ({g['growth_pct']:+.1f} %) from {g['from_tokens']:,} to {g['to_tokens']:,} tokens",
          g["growth_pct"] <= 3.0, "flat = under 3 % of RSS")
    if "herd_calls" in ab:
        d = ab["herd_calls"].get("D")
        t("herd: ≤ 1 webhook call per worker (2 workers)", f"D {d}, E {ab['herd_calls'].get('E')}, B {ab['herd_calls'].get('B')}",
          d is not None and d <= 2)
    w = res["meta"].get("wasm_bytes")
    if w:
        t(".wasm ≤ 300 KB", f"{w / 1000:.0f} KB ({w:,} bytes)", w <= 300_000)
    return out


def _num(x, unit=""):
    if x is None:
        return "—"
    if float(x) == int(x) and abs(x) < 1e6:
        return f"{int(x):,}{unit}"
    if abs(x) >= 100:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def table(res, s):
    meta = res["meta"]
    head = "| figure | " + " | ".join(f"{x} {meta['setups'][x]}" for x in SETUPS) + " |"
    lines = [head, "|" + " --- |" * (len(SETUPS) + 1)]

    def row(label, key, unit="", ratio=True):
        ab = s["abs"].get(key, {})
        rt = s["ratio"].get(key, {})
        cells = []
        for x in SETUPS:
            v = ab.get(x)
            if v is None:
                cells.append("—")
            elif x == "A" or not ratio or rt.get(x) is None:
                cells.append(_num(v, unit))
            else:
                cells.append(f"{_num(v, unit)} (**{rt[x]:.2f}**)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if res.get("rounds"):
        p = meta["params"]
        row("1. handshakes/s, 32 keep-alive conns", "hs_rps")
        row("1. handshake p50 / p99 under that load (µs)", "hs_p50_us")
        row("   p99", "hs_p99_us")
        row("1. handshake p50, 1 conn (µs)", "lat_p50_us")
        row("   p99, 1 conn (µs)", "lat_p99_us")
        row("1. Envoy CPU per handshake (µs)", "hs_cpu_us")
        row("1. auth service CPU per handshake (µs): ext_authz service or webhook", "hs_auth_cpu_us", ratio=False)
        row("2. events/s, 1 stream", "flood1_eps")
        row(f"2. events/s, {p['many_streams']} streams", "floodN_eps")
        row("2. Envoy CPU per event, 1 stream (ns)", "flood1_cpu_ns")
        row(f"2. per-event latency p50, {p['paced_streams']} paced streams, heartbeats on (µs)", "paced_p50_us")
        row("   p99 (µs)", "paced_p99_us")
        row("2. Envoy CPU per event, paced: one chunk per event (µs)", "paced_cpu_us")
        rs = res.get("rs_too_large")
        if rs:
            lines.append("| 2. streams Envoy reset during the floods (`rs_too_large`) | "
                         + " | ".join(_num(rs.get(x)) for x in SETUPS) + " |")
    if "mem_kb" in s["abs"]:
        n = res["memory"]["A"]["streams"]
        row(f"3. RSS per open stream, {n:,} streams (KiB)", "mem_kb")
    if "herd_calls" in s["abs"]:
        row(f"4. herd: auth calls for {meta['params']['herd_n']:,} simultaneous connects", "herd_calls", ratio=False)
        row("4. herd: all answered after (ms)", "herd_ms", ratio=False)
    w = meta.get("wasm_bytes")
    if w:
        lines.append("| 5. `.wasm` size | | | | " + f"{w:,} bytes | {w:,} bytes |")
    # fix the "p50 / p99" row label pair readability
    return "\n".join(lines).replace("| 1. handshake p50 / p99 under that load (µs)", "| 1. handshake p50 under that load (µs)")


def short_version(v):
    """'<sha>/1.40.0/Clean/RELEASE/BoringSSL' -> '1.40.0'"""
    parts = str(v).split("/")
    return parts[1] if len(parts) > 2 else str(v)


def svg_chart(res, s):
    metrics = [
        ("hs_rps", "handshakes/s ↑"),
        ("lat_p50_us", "handshake p50, 1 conn ↓"),
        ("hs_cpu_us", "Envoy CPU / handshake ↓"),
        ("flood1_eps", "events/s, 1 stream ↑"),
        ("paced_cpu_us", "Envoy CPU / event (paced) ↓"),
        ("floodN_eps", "events/s, many streams ↑"),
        ("paced_p50_us", "per-event latency p50 ↓"),
        ("paced_p99_us", "per-event latency p99 ↓"),
        ("mem_kb", "memory / open stream ↓"),
    ]
    metrics = [m for m in metrics if m[0] in s["ratio"]]
    bars = ["B", "C", "D", "E"]
    bar_h, gap, left, width, top = 13, 16, 210, 860, 60
    group_h = len(bars) * bar_h + gap
    height = top + len(metrics) * group_h + 50
    vmax = 3.0
    scale = (width - left - 60) / vmax
    meta = res["meta"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="Helvetica,Arial,sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">'
           f'Ratio to bare Envoy (A = 1.0), same run, median of {meta["params"]["rounds"]} rounds</text>',
           f'<text x="{width / 2}" y="38" text-anchor="middle" fill="#555">Envoy {short_version(meta["envoy_version"])}, '
           f'--concurrency 2, {meta["machine"]["cores"]} cores, {meta["date"]}; ↑ higher is better, ↓ lower is better</text>']
    for i in range(0, int(vmax) + 1):
        x = left + i * scale
        out.append(f'<line x1="{x}" y1="{top - 6}" x2="{x}" y2="{height - 40}" stroke="#ddd"/>')
        out.append(f'<text x="{x}" y="{height - 26}" text-anchor="middle" fill="#555">{i}.0</text>')
    x1 = left + scale
    out.append(f'<line x1="{x1}" y1="{top - 6}" x2="{x1}" y2="{height - 40}" stroke="#333" stroke-width="1.5"/>')
    for gi, (key, label) in enumerate(metrics):
        y0 = top + gi * group_h
        out.append(f'<text x="{left - 8}" y="{y0 + len(bars) * bar_h / 2 + 4}" text-anchor="end">{label}</text>')
        for bi, b in enumerate(bars):
            v = s["ratio"][key].get(b)
            y = y0 + bi * bar_h
            if v is None:
                continue
            w = min(v, vmax) * scale
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{COLORS[b]}"/>')
            txt = f"{b} {v:.2f}" + ("…" if v > vmax else "")
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" font-size="10" fill="#333">{txt}</text>')
    ly = height - 12
    for i, b in enumerate(bars):
        lx = 40 + i * 205
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{COLORS[b]}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly}" font-size="11">{b} {meta["setups"][b]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def callgrind_section(cg, note=""):
    """Instructions inside Envoy (python3 bench/run.py --only callgrind)."""
    per = {(r["label"], r["what"]): r["per_op"] for r in cg}
    md = ["## Instructions inside Envoy (callgrind)\n",
          "`python3 bench/run.py --only callgrind` runs each Envoy with `--concurrency 1` under "
          "`valgrind --tool=callgrind` and counts every instruction it executes (Envoy's C++, V8, the "
          "filter's wasm) over 1,000 handshakes, or over the events of 10 streams each sending one event "
          "every 50 ms (one chunk per event). Counts do not move with the machine's load.\n" + note,
          "| setup | instructions per handshake | over A | per event | over A |",
          "| --- | --- | --- | --- | --- |"]
    names = {"A": "bare Envoy", "B": "ext_authz (HTTP; its service's own work not counted)",
             "C": "jwt_authn (RS256, local JWKS)", "N": "no-op wasm filter", "V": "RevenProx, development mode",
             "D": "RevenProx, cache warm", "E": "RevenProx, cache off"}
    a_hs, a_ev = per.get(("A", "handshake")), per.get(("A", "event"))
    for x in ("A", "B", "C", "N", "V", "D", "E"):
        hs, ev = per.get((x, "handshake")), per.get((x, "event"))
        if hs is None and ev is None:
            continue
        md.append(f"| {x} {names[x]} | {_num(hs)} | {'' if hs is None or x == 'A' or a_hs is None else f'{hs - a_hs:+,.0f}'} | "
                  f"{_num(ev)} | {'' if ev is None or x == 'A' or a_ev is None else f'{ev - a_ev:+,.0f}'} |")
    probes = [("N headers=20", "handshake", 20, "read of a request header that is present"),
              ("N shared=20", "handshake", 20, "shared-data read (a 64-byte value)"),
              ("N metrics=20", "handshake", 20, "counter increment"),
              ("N time=20", "handshake", 20, "clock read"),
              ("N tick=1", "handshake", 1, "tick period change"),
              ("N body=1", "event", 1, "read of a response chunk (~110 bytes)"),
              ("N queue=1", "event", 1, "hold a chunk and release it through the worker's shared queue (a 4-byte message per chunk)"),
              ("N signal=1", "event", 1, "hold a chunk and release it with one empty message for all chunks held meanwhile (RevenProx)")]
    rows = []
    for label, what, n, text in probes:
        v, base = per.get((label, what)), per.get(("N", what))
        if v is not None and base is not None:
            rows.append(f"| {text} | {(v - base) / n:,.0f} |")
    if rows:
        md.append("\nWhat one host call costs, measured with the probe filter (`bench/noop-wasm` with a "
                  "probe configuration, minus the no-op filter):\n")
        md.append("| host call | instructions per call |\n| --- | --- |")
        md.extend(rows)
    md.append("")
    return "\n".join(md)


def render(res):
    s = res.get("summary") or summarize(res)
    meta = res["meta"]
    m = meta["machine"]
    p = meta["params"]
    tbl = table(res, s)
    md = []
    md.append("# Benchmarks: RevenProx next to bare Envoy, ext_authz and jwt_authn\n")
    md.append("<!-- generated by `make bench` (bench/run.py + bench/report.py); edit bench/analysis.md for the prose -->\n")
    md.append(f"Measured by `make bench` on **{meta['date']}**: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, "
              f"Linux {m['kernel']}; Envoy **{short_version(meta['envoy_version'])}** (`{meta['envoy_version']}`, `--concurrency 2`); profile `{meta['profile']}`, "
              f"{p['rounds']} rounds, {meta.get('duration_s', 0):.0f} s; load average at start "
              f"{meta['load_avg_start'][0]:.2f}, at end {meta.get('load_avg_end', [0])[0]:.2f}.\n")
    md.append("Every setup fronts the same Rust upstream on 127.0.0.1 and gets the same requests (RS256 JWTs from a "
              "pool of 64, rotated per request). **Bold numbers are ratios to A measured in the same round** "
              "(median over rounds); absolute numbers are medians and only mean something on this machine. "
              "Runs on a shared 2-core machine are noisy (±0.15 on a ratio).\n")
    md.append("| setup | what runs in front of the router |\n| --- | --- |")
    md.append("| A | nothing: bare Envoy, the limit |")
    md.append("| B | `envoy.filters.http.ext_authz`, HTTP service: one call to the Rust auth service per request |")
    md.append("| C | `envoy.filters.http.jwt_authn`, RS256 with a local JWKS: signature verified per request (no JWT cache) |")
    md.append("| D | RevenProx, verdict cache warm (each pool token verified once, then served from shared data) |")
    md.append("| E | RevenProx with `cache_ttl_sec: 0`: a webhook verification per request (identical concurrent ones still share one) |\n")
    md.append("![ratios to bare Envoy](bench/ratios.svg)\n")
    md.append("## Results\n")
    md.append(tbl + "\n")
    if res.get("rounds"):
        hb = [r["paced"].get("heartbeats", 0) for r in res["rounds"] if r["setup"] == "D" and "paced" in r]
        md.append("How each figure is measured (all setups get identical requests, alternating, "
                  f"{p['rounds']} rounds, order rotated per round):\n")
        md.append(f"1. **Handshakes**: `wrk -t1 -c32 -d{p['hs_secs']}s` (Debian's wrk, `bench/wrk.lua`) on "
                  "`GET /events/bench` with `Authorization: Bearer <jwt>`; the upstream answers a short complete "
                  "SSE response (`200 text/event-stream`, one event). Keep-alive connections: each handshake is a "
                  "new HTTP stream (request, auth, response headers, SSE session open and close). Latency under "
                  f"load from that run; unloaded latency from `wrk -c1 -d{p['lat_secs']}s`. Envoy CPU = its "
                  "`utime+stime` over the run / requests.")
        md.append(f"2. **Streaming**: `bench/target/release/benchc stream` (Rust, tokio+hyper). Events/s: the "
                  f"upstream writes events (~110 bytes) as fast as each stream takes them, counted over "
                  f"{p['flood_secs']} s after {p['warmup']} s warm-up, on 1 and on {p['many_streams']} streams. "
                  f"Latency: {p['paced_streams']} streams, one event every {p['paced_ms']} ms for 1 s then 1.2 s "
                  "of silence, repeated; every event carries its send time (`\"t\":<unix ns>`) and the client "
                  "subtracts it from the arrival time. D and E run with `heartbeat_interval_sec: 1`, so a "
                  f"heartbeat is injected in every silence ({sum(hb):,} heartbeats reached D's clients in the "
                  "latency runs).")
        md.append("3. **Memory**, 4. **herd**, 5. **size**: see the sections below.\n")
    md.append("## Targets\n")
    md.append("| target | measured | met |\n| --- | --- | --- |")
    for t in s["targets"]:
        md.append(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**not met**'} |")
    md.append("")
    c = res.get("ceilings")
    if c:
        md.append("## The upstream and the auth backends are not the limit\n")
        md.append("Measured alone with the same load generators, in the same run (they share the 2 cores with "
                  "everything else, so these are lower bounds of their ceilings):\n")
        md.append("| server | alone | best through Envoy |\n| --- | --- | --- |")
        best_hs = max((v for v in s["abs"].get("hs_rps", {}).values() if v), default=None)
        md.append(f"| upstream, short SSE responses/s | {c['upstream_handshakes_per_s']:,.0f} | {_num(best_hs)} |")
        md.append(f"| upstream, events/s on 1 stream | {c['upstream_events_per_s_1_stream']:,.0f} | "
                  f"{_num(max((v for v in s['abs'].get('flood1_eps', {}).values() if v), default=None))} |")
        md.append(f"| upstream, events/s on {p['many_streams']} streams | {c['upstream_events_per_s_many']:,.0f} | "
                  f"{_num(max((v for v in s['abs'].get('floodN_eps', {}).values() if v), default=None))} |")
        md.append(f"| webhook (D/E), verifications/s | {c['webhook_verifications_per_s']:,.0f} | "
                  f"{_num(s['abs'].get('hs_rps', {}).get('E'))} (E) |")
        md.append(f"| ext_authz service (B), checks/s | {c['authz_checks_per_s']:,.0f} | "
                  f"{_num(s['abs'].get('hs_rps', {}).get('B'))} (B) |\n")
    if s.get("steps") and s["abs"]["hs_cpu_us"].get("N") is not None:
        ab, st = s["abs"], s["steps"]
        md.append("## Where the filter's cost goes, inside Envoy\n")
        md.append("Two more Envoys run in the same rounds (handshakes and the 1-stream flood only): **N**, a Rust "
                  "proxy-wasm filter that does nothing (`bench/noop-wasm`), and **V**, RevenProx in development mode "
                  "(no webhook: it strips the identity header and tokens, and runs the SSE session of every "
                  "event-stream response, but verifies nothing). Envoy CPU time (`utime+stime`) per handshake and "
                  "per event; each step is the median of the per-round differences.\n")
        md.append("| setup | Envoy CPU per handshake (µs) | step | Envoy CPU per event, 1 stream (ns) | step | what the step adds |\n"
                  "| --- | --- | --- | --- | --- | --- |")
        rows = [("A", None, "bare Envoy"),
                ("N", "N-A", "a proxy-wasm filter in V8: a context per stream, a VM call per callback"),
                ("V", "V-N", "RevenProx without auth: header reads/removal, path stripping, SSE session, "
                             "hold-and-release of every chunk through the worker queue"),
                ("D", "D-V", "authentication from the cache: precheck, SHA-256 key, 2 shared-data reads, "
                             "identity header, stream registry write"),
                ("E", "E-D", "a webhook call per request (dispatch, response, verdict parse)")]
        for x, step, what in rows:
            c1 = ab["hs_cpu_us"].get(x)
            c2 = ab["flood1_cpu_ns"].get(x)
            s1 = st["hs_cpu_us"].get(step) if step else None
            s2 = st["flood1_cpu_ns"].get(step) if step else None
            md.append(f"| {x} {res['meta']['setups'].get(x, '')} | {_num(c1)} | {'' if s1 is None else f'{s1:+.0f}'} | "
                      f"{_num(c2)} | {'' if s2 is None else f'{s2:+.0f}'} | {what} |")
        md.append("")
    cg = res.get("callgrind")
    cg_note = ""
    if not cg and (REPO / "docs/bench/callgrind.json").exists():
        saved = json.loads((REPO / "docs/bench/callgrind.json").read_text())
        cg = saved["rows"]
        cg_note = (f"From the last `--only callgrind` run ({saved['date']}, Envoy {saved['envoy_version']}, "
                   f"`.wasm` of {saved['wasm_bytes']:,} bytes; `docs/bench/callgrind.json`).\n")
    if cg:
        md.append(callgrind_section(cg, cg_note))
    mem = res.get("memory")
    if mem:
        md.append("## Memory per open stream\n")
        md.append(f"A fresh Envoy per setup; {mem['A']['streams']:,} SSE streams opened (one HTTP/1.1 connection each, "
                  "one event, then quiet; D/E with default heartbeats), RSS (`VmRSS`) read 2 s after the last one "
                  "opened. Distinct tokens (users) per stream in A, B, D, E; C cycles 64 signed tokens "
                  "(jwt_authn keeps no per-token state). The upstream cluster is h2c here: the container's hard "
                  f"limit of {meta['machine']['nofile_limit']:,} file descriptors cannot hold 10,000 downstream plus "
                  "10,000 upstream HTTP/1.1 connections.\n")
        md.append("| setup | opened | RSS before (MiB) | RSS open (MiB) | per stream (KiB) | ratio to A |\n"
                  "| --- | --- | --- | --- | --- | --- |")
        for x in SETUPS:
            if x in mem:
                v = mem[x]
                md.append(f"| {x} | {v['opened']:,} | {v['rss_before_kb'] / 1024:.1f} | {v['rss_open_kb'] / 1024:.1f} | "
                          f"{v['per_stream_kb']:.2f} | {_fmt_ratio(s['ratio']['mem_kb'].get(x))} |")
        md.append("")
    if mem and any("cpu_pct" in v for v in mem.values()):
        md.append(f"Envoy's CPU while those streams are open and quiet, over {p.get('mem_cpu_secs', 0)} s: "
                  + ", ".join(f"{x} {mem[x]['cpu_pct']:.1f} %" for x in SETUPS if x in mem and "cpu_pct" in mem[x])
                  + " (D and E send a heartbeat into every stream every 15 s).\n")
    sc = res.get("scale")
    if sc:
        md.append("## Open streams at scale\n")
        any_s = next(iter(sc.values()))
        md.append(f"A fresh Envoy per setup, {any_s['streams']:,} SSE streams over HTTP/1.1 (distinct tokens), one in "
                  "four of each upstream pattern: one event then silence; an event every 700 ms; an event every "
                  "500 ms; bursts of 10 events 20 ms apart, then 3 s of silence. Every stream is read to the end. "
                  f"D runs with `heartbeat_interval_sec: 1`. Envoy's CPU (`utime+stime`) over {p.get('scale_secs')} s "
                  "once all are open, RSS 3 s after the last one opened.\n")
        md.append("| setup | opened | Envoy CPU | ratio to A | RSS per stream (KiB) | ratio to A | events received | heartbeats received |\n"
                  "| --- | --- | --- | --- | --- | --- | --- | --- |")
        a = sc.get("A", {})
        for x in ("A", "D"):
            if x in sc:
                v = sc[x]
                cr = v["cpu_pct"] / a["cpu_pct"] if a.get("cpu_pct") else None
                mr = v["per_stream_kb"] / a["per_stream_kb"] if a.get("per_stream_kb") else None
                rc = v.get("received", {})
                md.append(f"| {x} | {v['opened']:,} | {v['cpu_pct']:.1f} % | {_fmt_ratio(cr)} | {v['per_stream_kb']:.1f} | "
                          f"{_fmt_ratio(mr)} | {rc.get('events', 0):,} | {rc.get('heartbeats', 0):,} |")
        md.append("")
    cl = res.get("cliff")
    if cl:
        md.append("## No CPU cliff near expiry\n")
        md.append(f"A fresh D (`heartbeat_interval_sec: 1`, `challenge_before_expiry_sec: {cl['challenge_before_expiry_sec']}`), "
                  f"{cl['opened']:,} streams of the same four patterns opened within {cl['open_secs']:.1f} s, each with "
                  f"its own token expiring {cl['ttl_sec']} s later; the webhook answers with the token's own `exp`, so "
                  "nothing extends it and the clients ignore the challenge: every stream sits in its last "
                  f"{cl['challenge_before_expiry_sec']} + 5 s until it expires. Envoy's CPU over {cl['outside_secs']:.0f} s "
                  f"before any stream is in that window, and over {cl['inside_secs']:.0f} s while every stream is in it "
                  "(its challenge and its one server-side refresh call included).\n")
        md.append("| | Envoy CPU | webhook calls | challenges sent |\n| --- | --- | --- | --- |")
        md.append(f"| outside the window | {cl['cpu_outside_pct']:.1f} % | {cl['webhook_calls_outside']:,} | |")
        md.append(f"| inside the window | {cl['cpu_inside_pct']:.1f} % ({_fmt_ratio(cl['ratio'])} ×) | "
                  f"{cl['webhook_calls_inside']:,} | {cl['challenges_inside']:,} |")
        md.append(f"\nAfter the expiry: {_num(cl.get('expired_at_end'))} streams expired, "
                  f"{_num(cl.get('open_at_end'))} still open.\n")
    rv = res.get("reverify")
    if rv:
        md.append("## Re-verification of open streams\n")
        base = (res.get("memory") or {}).get("D", {}).get("cpu_pct")
        md.append(f"A fresh D with `sse.reverify_interval_sec: {rv['interval_sec']}`, {rv['opened']:,} open streams (one "
                  "event, then quiet; upstream h2c as in the memory phase), each with its own token, so no two share "
                  f"a call. Over {rv['window_secs']:.0f} s (two rounds: a stream asks again 0.9–1.0 × the interval after its "
                  "last verdict) once every stream had re-verified once:\n")
        md.append("| open streams | interval | webhook calls/s | open streams ÷ (0.95 × interval) | Envoy CPU | Envoy CPU, same streams, no re-verification in the window | failures |\n"
                  "| --- | --- | --- | --- | --- | --- | --- |")
        md.append(f"| {rv['opened']:,} | {rv['interval_sec']} s | {rv['webhook_calls_per_s']:,.0f} | "
                  f"{rv['expected_calls_per_s']:,.0f} | {rv['cpu_pct']:.1f} % | "
                  f"{'—' if base is None else f'{base:.1f} %'} | {rv['reverify_failures']} |\n")
    cache = res.get("cache")
    if cache:
        md.append("## Verdict cache memory\n")
        md.append(f"A fresh D with `cache_max_size: {cache['cache_max_size']:,}`; every request carries a new token "
                  "(a webhook verification and a cache store each).\n")
        md.append("| distinct tokens | RSS (MiB) | webhook calls | verifications/s |\n| --- | --- | --- | --- |")
        for pt in cache["points"]:
            md.append(f"| {pt['tokens']:,} | {pt['rss_kb'] / 1024:.1f} | {_num(pt.get('webhook_calls'))} | "
                      f"{_num(pt.get('rps'))} |")
        md.append("")
    herd = res.get("herd")
    if herd:
        md.append("## Thundering herd\n")
        md.append(f"{p['herd_n']:,} connections opened first, then {p['herd_n']:,} requests with one fresh token "
                  f"written at once; the webhook and the ext_authz service answer that topic after "
                  f"{meta['herd_delay_ms']} ms (a slow auth backend, where herds hurt). Auth calls counted by the "
                  f"servers; {p['herd_rounds']} rounds, the worst shown.\n")
        md.append("| setup | auth calls | single-flight joins | statuses | all answered (ms) |\n| --- | --- | --- | --- | --- |")
        for x in SETUPS:
            if herd.get(x):
                worst = max(herd[x], key=lambda h: h["auth_calls"])
                md.append(f"| {x} | {worst['auth_calls']:,} | {worst['singleflight_joins']:,.0f} | "
                          f"{', '.join(f'{k}: {v}' for k, v in worst['statuses'].items())} | {worst['all_done_ms']:.0f} |")
        md.append("")
    hp = res.get("hotpath")
    if hp:
        md.append("## Hot path of the filter (pure core, native)\n")
        md.append(f"`bench/src/bin/hotpath.rs` runs the filter's core crate (`core/`, "
                  f"the shipped code) in a loop, each step (token: a {hp['token_len']}-byte RS256 JWT). "
                  "Instructions per operation come from `valgrind --tool=callgrind` (stable on a busy machine); "
                  "nanoseconds are native x86-64 wall clock (noisy here). In Envoy the same code runs as wasm "
                  "in V8, slower by a constant factor.\n")
        has_ir = any("instructions_per_op" in c for c in hp["cases"])
        md.append("| step | instructions/op | ns/op | what |\n| --- | --- | --- | --- |" if has_ir else
                  "| step | ns/op | what |\n| --- | --- | --- |")
        for c in hp["cases"]:
            if has_ir:
                md.append(f"| `{c['case']}` | {c.get('instructions_per_op', 0):,} | {c['ns_per_op']:.0f} | {c['what']} |")
            else:
                md.append(f"| `{c['case']}` | {c['ns_per_op']:.0f} | {c['what']} |")
        md.append("")
    fs = res.get("filter_stats")
    if fs and fs.get("D"):
        d, e = fs["D"], fs["E"]
        md.append(f"Filter counters after the rounds: D {d.get('revenprox_requests', 0):,.0f} requests, "
                  f"{d.get('revenprox_cache_hits', 0):,.0f} cache hits, {d.get('revenprox_webhook_calls', 0):,.0f} "
                  f"webhook calls; E {e.get('revenprox_requests', 0):,.0f} requests, "
                  f"{e.get('revenprox_webhook_calls', 0):,.0f} webhook calls, "
                  f"{e.get('revenprox_singleflight_joins', 0):,.0f} single-flight joins.\n")
    analysis = REPO / "bench" / "analysis.md"
    if analysis.exists():
        md.append(analysis.read_text().rstrip() + "\n")
    md.append("## Reproduce\n")
    md.append("```sh\nmake bench                      # full run, ~10 minutes, writes this file and docs/bench/\n"
              "python3 bench/run.py --quick     # the same pipeline, small and short (development)\n"
              "python3 bench/report.py docs/bench/results.json   # re-render from the raw results\n```\n")
    md.append("Raw numbers of this run: [`bench/results.json`](bench/results.json).\n")
    text_table = tbl + "\n\nTargets:\n" + "\n".join(
        f"  {'met    ' if t['met'] else 'NOT MET'}  {t['target']}: {t['measured']}" for t in s["targets"])
    return "\n".join(md), text_table, svg_chart(res, s)


def rerender(path=REPO / "docs/bench/results.json"):
    """Writes docs/benchmarks.md and docs/bench/ratios.svg again from the raw results of a run (and
    the saved callgrind counts); returns the text table."""
    res = json.loads(Path(path).read_text())
    res["summary"] = summarize(res)
    md, tbl, svg = render(res)
    (REPO / "docs/bench").mkdir(parents=True, exist_ok=True)
    (REPO / "docs/benchmarks.md").write_text(md)
    (REPO / "docs/bench/ratios.svg").write_text(svg)
    return tbl


if __name__ == "__main__":
    print(rerender(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs/bench/results.json"))
