"""The results as a table (every figure side by side with the baselines and its target) and a chart."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil

from qanot_worker import eventloop

HERE = Path(__file__).resolve().parent


ROWS = [
    ("sequential p50 (µs)", "p50_us", "{:.0f}", "≤ 1.3× b"),
    ("sequential p99 (µs)", "p99_us", "{:.0f}", ""),
    ("calls/s, concurrency 1", "tp1", "{:.0f}", ""),
    ("calls/s, concurrency 16", "tp16", "{:.0f}", ""),
    ("calls/s, concurrency 64", "tp64", "{:.0f}", "≥ 0.7× b, ≥ 50× d"),
    ("calls/s, conc. 64 over 4 workers", "tp64x4", "{:.0f}", ""),
    ("cold start, spawn to tools listed p50 (ms)", "cold_ms", "{:.1f}", "≤ 25 ms, ≥ 20× faster than d"),
    ("whole host start with 1 plugin p50 (ms)", "host_start_ms", "{:.1f}", ""),
    ("sandbox set-up per worker start p50 (ms)", "sandbox_ms", "{:.2f}", "≤ 5 ms"),
    ("... with network narrowed to hosts p50 (ms)", "egress_sandbox_ms", "{:.2f}", "≤ 5 ms"),
    ("restart after SIGKILL to ready p50 (ms)", "restart_ms", "{:.1f}", "≤ 50 ms"),
    ("idle worker USS (MB)", "uss_mb", "{:.1f}", "≤ 8 MB"),
    ("idle worker RSS (MB)", "rss_mb", "{:.1f}", ""),
    ("... its namespace's init USS (MB)", "init_uss_mb", "{:.2f}", ""),
    ("sequential p99, idle (µs)", "idle_p99_us", "{:.0f}", ""),
    ("... while another plugin spins every core (µs)", "busy_p99_us", "{:.0f}", ""),
    ("... busy ÷ idle", "busy_ratio", "{:.2f}", "≤ 3"),
    ("50 plugins all ready (ms)", "fifty_ms", "{:.0f}", "≤ 1500 ms"),
    ("host RSS + 50 workers' USS (MB)", "fifty_mb", "{:.0f}", "< 600 MB"),
    ("10 MB result (MB/s)", "blob_mbs", "{:.0f}", "≥ 300 MB/s"),
]


def render(results: dict, quick: bool) -> str:
    side = results.pop("mcp", None)
    tp_side = results.pop("tp_side", None)
    keys = list(results)
    header = "| figure | " + " | ".join(results[k]["label"] for k in keys) + " | e ÷ b | target |"
    lines = [header, "|" + " --- |" * (len(keys) + 3)]
    for title, field, fmt, target in ROWS:
        cells = [fmt.format(results[k][field]) if field in results[k] else "–" for k in keys]
        e, b = results["e"].get(field), results["b"].get(field)
        ratio = f"{e / b:.2f}" if e is not None and b else "–"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {ratio} | {target} |")
    e, d, c = results["e"], results["d"], results["c2"]
    lines += ["", "Ratios the targets name:",
              f"- sequential p50: e is {e['p50_us'] / results['b']['p50_us']:.2f}× b, "
              f"{d['p50_us'] / e['p50_us']:.1f}× faster than d, "
              f"{min(c['p50_us'], results['c1']['p50_us']) / e['p50_us']:.2f}× faster than c (the faster c)",
              f"- throughput at 64 on one worker: e is {e['tp64'] / results['b']['tp64']:.2f}× b and "
              f"{e['tp64'] / d['tp64']:.0f}× d",
              *([f"- throughput at 64, b and e side by side (both running, their runs alternating, the same "
                 f"minutes of the machine for each): b {tp_side['b']:.0f}, e {tp_side['e']:.0f} calls/s "
                 f"({tp_side['e'] / tp_side['b']:.2f}× b); target: at least 0.7× b"] if tp_side else []),
              f"- cold start: e is {d['cold_ms'] / e['cold_ms']:.1f}× faster than d"]
    f = results.get("f")
    if f:
        lines.append(f"- through MCP (stdio, the SDK's client): f (qanot-host mcp, sandboxed worker) p50 is "
                     f"{f['p50_us'] / d['p50_us']:.2f}× d (the bare SDK server), throughput at 16 "
                     f"{f['tp16'] / d['tp16']:.2f}× d; target: at most 1.10× d's p50")
    g = results.get("g")
    if g:
        lines.append(f"- an MCP server supervised and sandboxed: g (d's server as an mcp_servers entry, called through "
                     f"execute()) p50 is {g['p50_us'] / d['p50_us']:.2f}× d (the same server called directly by the "
                     f"SDK's client), throughput at 16 {g['tp16'] / d['tp16']:.2f}× d; target: at most 1.10× d's p50")
    if side:
        lines.append(f"- d, f and g side by side (running at once, called in alternating blocks of 100, the same "
                     f"moments of the machine for each): p50 d {side['d']:.0f} µs, f {side['f']:.0f} µs "
                     f"({side['f'] / side['d']:.2f}× d), g {side['g']:.0f} µs ({side['g'] / side['d']:.2f}× d); "
                     "target: f and g at most 1.10× d")
    machine = (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Linux {platform.release()}, "
               f"Python {platform.python_version()}, event loop {eventloop.loop_name()}")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = (HERE / "profile.md").read_text() if (HERE / "profile.md").exists() else ""
    return (f"# Benchmark results{' (--quick)' if quick else ''}\n\n{when} on {machine}\n\n"
            + "\n".join(lines) + "\n\n" + notes)


def chart(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    keys = list(results)
    labels = [results[k]["label"] for k in keys]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(labels, [results[k]["p50_us"] for k in keys], color="#4c72b0")
    axes[0].set_xscale("log")
    axes[0].set_title("sequential latency p50 (µs, log)")
    axes[1].barh(labels, [results[k]["tp64"] for k in keys], color="#55a868")
    axes[1].set_xscale("log")
    axes[1].set_title("calls/s at concurrency 64, one worker (log)")
    for ax in axes:
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
