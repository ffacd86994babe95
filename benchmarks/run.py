"""qanot-host against what users would pick instead, in one run on one machine.

    python benchmarks/run.py            # the full run (under 3 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer iterations; CI runs this so the benchmark never rots

Contenders (contenders.py), all running the same echo (workload.py / plugins/bench):
  a  in-process await of the handler, as Qanot's own loader does: the floor
  b  bare transport: msgspec frames over a pipe to one Python process, uvloop, no host logic
  c  multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor
  d  a stdio tool server built with the official MCP Python SDK
  e  qanot-host, through ToolRegistry.execute()
  f  qanot-host's MCP front (`qanot-host mcp`, stdio) with the SDK's client: the same call as d
  g  d's server run by qanot-host as an mcp_servers entry (sandboxed, supervised), through execute()

Writes benchmarks/results/latest.md and latest.png. Figures are printed, never asserted: this is
not a test, and it fails only if it cannot run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from qanot_worker import eventloop  # noqa: E402

from contenders import (BarePipe, InProcess, Mcp, McpHost, McpServerHost, MultiprocessingPool,  # noqa: E402
                        ProcessPool, QanotHost)
from measurements import (blob_rate, cold_start, cpu_share, egress_sandbox_cost, fifty_plugins,  # noqa: E402
                          interleaved_p50, interleaved_throughput, latency, memory, restart_to_ready, throughput,
                          worker_cold_start)
from report import chart, render  # noqa: E402


async def measure(quick: bool) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="qanot-bench-"))
    n_lat, n_tp, reps = (200, 400, 3) if quick else (5000, 10000, 10)
    makers = {"a": InProcess, "b": BarePipe, "c1": MultiprocessingPool, "c2": ProcessPool, "d": Mcp,
              "e": lambda: QanotHost(scratch), "f": lambda: McpHost(scratch), "g": lambda: McpServerHost(scratch)}
    results: dict[str, dict] = {key: {} for key in makers}
    try:
        for key, make in makers.items():
            slow = key in ("d", "f", "g")  # MCP is orders of magnitude slower: fewer calls, same figures
            # What earlier contenders left in this process (MCP's and pydantic's modules, ...) is
            # frozen out of the collector: measured, a full collection of it took 47 ms in the
            # middle of a later contender's run. Each contender pays for its own heap only.
            gc.collect()
            gc.freeze()
            contender = make()
            await contender.start(1)
            r = results[key]
            r["label"] = contender.label
            await throughput(contender, 16, n_tp // 40 if slow else n_tp // 4, trials=1)  # warm-up, discarded
            r["p50_us"], r["p99_us"] = await latency(contender, n_lat // 5 if slow else n_lat)
            for c in (1, 16, 64):
                r[f"tp{c}"] = await throughput(contender, c, n_tp // 10 if slow else n_tp)
            if contender.pids():
                r["uss_mb"], r["rss_mb"] = memory(contender.pids())
            if getattr(contender, "init_pids", None) and contender.init_pids():
                r["init_uss_mb"], _ = memory(contender.init_pids())
            if key != "f":  # qanot-host's MCP front cuts a result at 100 000 characters, by design
                r["blob_mbs"] = await blob_rate(contender, 3 if slow or quick else 7)
            await contender.stop()
            if key != "a":
                contender = make()
                await contender.start(4)
                r["tp64x4"] = await throughput(contender, 64, n_tp // 10 if slow else n_tp)
                await contender.stop()
                if key != "e":
                    r["cold_ms"] = await cold_start(make, 2 if slow or quick else reps)
            print(f"  measured {r['label']}", file=sys.stderr)
        results["mcp"] = await mcp_side_by_side(scratch, 3 if quick else 10)
        results["tp_side"] = await throughput_side_by_side(scratch, n_tp, 3 if quick else 9)
        e = results["e"]
        e["cold_ms"], e["host_start_ms"], e["sandbox_ms"] = await worker_cold_start(scratch, reps)
        results["e"]["restart_ms"] = await restart_to_ready(scratch, reps)
        results["e"]["egress_sandbox_ms"] = await egress_sandbox_cost(scratch, reps)
        results["e"]["fifty_ms"], results["e"]["fifty_mb"] = await fifty_plugins(scratch)
        e["idle_p99_us"], e["busy_p99_us"] = await cpu_share(scratch, n_lat // 2)
        e["busy_ratio"] = e["busy_p99_us"] / e["idle_p99_us"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


async def mcp_side_by_side(scratch: Path, rounds: int) -> dict:
    """d, f and g running at once, called in turns (interleaved_p50): the ratios #12's targets name."""
    running = {"d": Mcp(), "f": McpHost(scratch / "side"), "g": McpServerHost(scratch)}
    for contender in running.values():
        await contender.start(1)
    try:
        for contender in running.values():  # warm each (the first calls of a session are slower)
            for _ in range(100):
                await contender.call()
        return await interleaved_p50(running, rounds)
    finally:
        for contender in reversed(running.values()):  # the SDK's scopes end in the order opposite to their start
            await contender.stop()


async def throughput_side_by_side(scratch: Path, total: int, rounds: int) -> dict:
    """b and e running at once, their runs at 64 in flight alternating: the ratio the target names,
    from the same minutes of the machine."""
    running = {"b": BarePipe(), "e": QanotHost(scratch)}
    for contender in running.values():
        await contender.start(1)
        await throughput(contender, 64, total // 4, trials=1)  # warm-up, discarded
    try:
        return await interleaved_throughput(running, 64, total, rounds)
    finally:
        for contender in running.values():
            await contender.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for latest.md/png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # restarts are on purpose here: keep their logs out
    results = eventloop.run(measure(args.quick))
    text = render(results, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(text)
    chart(results, out / "latest.png")
    print(text)


if __name__ == "__main__":
    main()
