"""qanot-host against what users would pick instead, in one run on one machine.

    python benchmarks/run.py            # the full run (under 3 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer iterations; CI runs this so the benchmark never rots

Contenders, all running the same echo (contenders.py / plugins/bench):
  a  in-process await of the handler, as Qanot's own loader does: the floor
  b  bare transport: msgspec frames over a pipe to one Python process, uvloop, no host logic
  c  multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor
  d  a stdio tool server built with the official MCP Python SDK
  e  qanot-host, through ToolRegistry.execute()

Writes benchmarks/results/latest.md and latest.png. Figures are printed, never asserted: this is
not a test, and it fails only if it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from contenders import blob, echo  # noqa: E402

from qanot_host import Host, load_config  # noqa: E402
from qanot_worker import eventloop  # noqa: E402

PARAMS = {"text": "hello", "n": 1}
BLOB = 10 * 1024 * 1024


# ---- contenders ---------------------------------------------------------------------------------

class InProcess:
    label = "a in-process"

    async def start(self, workers: int = 1) -> None:
        sys.path.insert(0, str(REPO / "qanot_worker" / "_shim"))
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_plugin", HERE / "plugins" / "bench" / "plugin.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.plugin = module.QanotPlugin()

    async def call(self, i: int = 0) -> str:
        return await self.plugin.echo(PARAMS)

    async def blob(self) -> str:
        return await self.plugin.blob({"size": BLOB})

    async def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []


class BarePipe:
    label = "b bare pipe"

    async def start(self, workers: int = 1) -> None:
        self.channels = [await _BareChannel.open() for _ in range(workers)]

    async def call(self, i: int = 0) -> str:
        return await self.channels[i % len(self.channels)].request("echo", PARAMS)

    async def blob(self) -> str:
        return await self.channels[0].request("blob", BLOB)

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.channels]


class _BareChannel(asyncio.Protocol):
    @classmethod
    async def open(cls) -> "_BareChannel":
        self = cls()
        self.buf, self.pending, self.ids = bytearray(), {}, 0
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        loop = asyncio.get_running_loop()
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "bare_echo.py"), str(child_reads), str(child_writes),
            pass_fds=(child_reads, child_writes))
        os.close(child_reads)
        os.close(child_writes)
        self.out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(parent_writes, "wb", buffering=0))
        self.transport, _ = await loop.connect_read_pipe(lambda: self, os.fdopen(parent_reads, "rb", buffering=0))
        await self.request("echo", {})
        return self

    def request(self, kind: str, arg) -> asyncio.Future:
        self.ids += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.ids] = future
        payload = self.enc.encode([self.ids, kind, arg])
        self.out.write(len(payload).to_bytes(4, "big") + payload)
        return future

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            size = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + size:
                break
            rid, result = self.dec.decode(self.buf[4:4 + size])
            del self.buf[:4 + size]
            self.pending.pop(rid).set_result(result)

    async def close(self) -> None:
        self.out.close()
        self.transport.close()
        await self.proc.wait()


class MultiprocessingPool:
    label = "c mp.Pool"

    async def start(self, workers: int = 1) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        await self.call()

    def _submit(self, fn, arg) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pool.apply_async(fn, (arg,), callback=lambda r: loop.call_soon_threadsafe(future.set_result, r))
        return future

    async def call(self, i: int = 0) -> str:
        return await self._submit(echo, PARAMS)

    async def blob(self) -> str:
        return await self._submit(blob, BLOB)

    async def stop(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def pids(self) -> list[int]:
        return [p.pid for p in self.pool._pool]


class ProcessPool:
    label = "c ProcessPoolExecutor"

    async def start(self, workers: int = 1) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
        await self.call()

    async def call(self, i: int = 0) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, echo, PARAMS)

    async def blob(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, blob, BLOB)

    async def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        return list(self.executor._processes)


class Mcp:
    label = "d MCP stdio"

    async def start(self, workers: int = 1) -> None:
        from contextlib import AsyncExitStack

        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client
        self.stack = AsyncExitStack()
        await self.stack.__aenter__()
        self.sessions = []
        for _ in range(workers):
            params = StdioServerParameters(command=sys.executable, args=[str(HERE / "mcp_echo_server.py")])
            errlog = self.stack.enter_context(open(os.devnull, "w"))  # noqa: ASYNC230 - /dev/null never blocks
            read, write = await self.stack.enter_async_context(stdio_client(params, errlog=errlog))
            session = await self.stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            await session.list_tools()
            self.sessions.append(session)

    async def call(self, i: int = 0) -> str:
        result = await self.sessions[i % len(self.sessions)].call_tool("bench_echo", PARAMS)
        return result.content[0].text

    async def blob(self) -> str:
        result = await self.sessions[0].call_tool("bench_blob", {"size": BLOB})
        return result.content[0].text

    async def stop(self) -> None:
        await self.stack.aclose()

    def pids(self) -> list[int]:
        return [c.pid for c in psutil.Process().children() if "mcp_echo_server" in " ".join(c.cmdline())]


class QanotHost:
    label = "e qanot-host"

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    async def start(self, workers: int = 1) -> None:
        names = ["bench"] + [f"bench{i}" for i in range(1, workers)]
        self.host = Host(write_config(self.scratch, names))
        await self.host.start()
        self.tools = [f"{n}_echo" if n != "bench" else "bench_echo" for n in names]

    async def call(self, i: int = 0) -> str:
        return await self.host.registry.execute(self.tools[i % len(self.tools)], PARAMS)

    async def blob(self) -> str:
        # invoke(): the result whole (execute() cuts it to 8000 characters, as Qanot's agent does)
        return await self.host.registry.invoke("bench_blob", {"size": BLOB})

    async def stop(self) -> None:
        await self.host.stop()

    def pids(self) -> list[int]:
        return [s.worker.pid for s in self.host.plugins.values()]

    def init_pids(self) -> list[int]:
        return [pid for pid in plugin_pids(self.host) if pid not in self.pids()]


def write_config(scratch: Path, names: list[str]) -> str:
    """Plugins named in `names`: 'bench' itself, the others copies with their own tool names."""
    plugins_dir = scratch / "plugins"
    for name in names:
        target = plugins_dir / name
        if name != "bench" and not target.exists():
            target.mkdir(parents=True)
            text = (HERE / "plugins" / "bench" / "plugin.py").read_text()
            (target / "plugin.py").write_text(text.replace('"bench_', f'"{name}_').replace(
                'name = "bench"', f'name = "{name}"'))
    config = scratch / f"config-{len(names)}.json"
    config.write_text(json.dumps({
        "plugins": [{"name": n} for n in names], "plugins_dir": str(plugins_dir),
        "workspace_dir": str(scratch / "workspace"),
        "host": {"state_dir": str(scratch / "state"), "builtin_plugins_dir": str(HERE / "plugins")}}))
    return str(config)


# ---- measurements -------------------------------------------------------------------------------

async def latency(contender, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await contender.call()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def throughput(contender, concurrency: int, total: int, trials: int = 5) -> float:
    """Calls per second with `concurrency` calls in flight: the median of `trials` runs, since
    one short run on this shared machine can land on a stall of someone else's."""
    rates = []
    for _ in range(trials):
        counter = iter(range(total))

        async def loop(k: int, counter=counter) -> None:
            for i in counter:
                await contender.call(i)

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        rates.append(total / (time.perf_counter() - started))
    return statistics.median(rates)


def memory(pids: list[int]) -> tuple[float, float]:
    uss = rss = 0.0
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        uss, rss = uss + info.uss, rss + info.rss
    count = max(len(pids), 1)
    return uss / count / 2**20, rss / count / 2**20


async def cold_start(make, reps: int) -> float:
    samples = []
    for _ in range(reps):
        contender = make()
        started = time.perf_counter()
        await contender.start()
        samples.append(time.perf_counter() - started)
        await contender.stop()
    return statistics.median(samples) * 1000


async def worker_cold_start(scratch: Path, reps: int) -> tuple[float, float, float]:
    """(e)'s figure: in a running host, from asking for a new plugin's worker to its tools listed;
    and, apart, a whole host start with one plugin (template included)."""
    host_starts = []
    for _ in range(reps):
        host = Host(write_config(scratch, ["bench"]))
        started = time.perf_counter()
        await host.start()
        host_starts.append(time.perf_counter() - started)
        await host.stop()
    samples, sandbox_costs = [], []
    async with Host(write_config(scratch, ["bench"])) as host:
        for i in range(1, reps + 1):
            names = ["bench"] + [f"bench{j}" for j in range(1, i + 1)]
            await host.reload(load_config(write_config(scratch, names)))
            samples.append(host.plugins[f"bench{i}"].worker.start_seconds)
            sandbox_costs.append(host.plugins[f"bench{i}"].worker.report.sandbox_ms)
    return (statistics.median(samples) * 1000, statistics.median(host_starts) * 1000,
            statistics.median(sandbox_costs))


async def egress_sandbox_cost(scratch: Path, reps: int) -> float:
    """Sandbox set-up of a worker whose network is narrowed to host:port pairs (the connect()
    listener, handed to the host, on top of every other layer)."""
    path = write_config(scratch, ["bench"])
    data = json.loads(Path(path).read_text())
    data["host"]["plugins"] = {"bench": {"permissions": {"network": {"hosts": ["127.0.0.1:9"]}}}}
    Path(path).write_text(json.dumps(data))
    costs = []
    for _ in range(reps):
        async with Host(path) as host:
            info = host.plugins["bench"].worker.report
            assert "egress-filter" in info.sandbox_layers, info.sandbox_warnings
            costs.append(info.sandbox_ms)
    return statistics.median(costs)


async def restart_to_ready(scratch: Path, reps: int) -> float:
    """The mechanism, not the policy: backoff off, so every kill is followed by an immediate restart."""
    path = write_config(scratch, ["bench"])
    data = json.loads(Path(path).read_text())
    data["host"]["restart"] = {"backoff_initial": 0, "max_restarts": 10 * reps}
    Path(path).write_text(json.dumps(data))
    async with Host(path) as host:
        supervisor = host.plugins["bench"]
        for _ in range(reps):
            worker = supervisor.worker
            await asyncio.sleep(0.05)
            os.kill(worker.pid, signal.SIGKILL)
            await worker.exited
            await supervisor.settled.wait()
        return statistics.median(supervisor.recoveries) * 1000


async def cpu_share(scratch: Path, n: int) -> tuple[float, float]:
    """Sequential p99 of one plugin's calls (µs), idle and while another plugin spins every core."""
    path = write_config(scratch, ["bench"])
    data = json.loads(Path(path).read_text())
    data["plugins"].append({"name": "spinner"})
    Path(path).write_text(json.dumps(data))
    async with Host(path) as host:
        bench = QanotHostOn(host)
        _, idle = await latency(bench, n)
        await host.registry.execute("spinner_start", {})
        await asyncio.sleep(0.5)
        try:
            _, busy = await latency(bench, n)
        finally:
            await host.registry.execute("spinner_stop", {})
    return idle, busy


class QanotHostOn:
    """A running host's bench plugin as a contender (for the figures that need a host of their own)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def call(self, i: int = 0) -> str:
        return await self.host.registry.execute("bench_echo", PARAMS)


def plugin_pids(host: Host) -> list[int]:
    """Each plugin's processes: the worker and its namespace's init."""
    pids = []
    for supervisor in host.plugins.values():
        worker = supervisor.worker
        if worker is not None and worker.pid:
            pids.append(worker.pid)
            if worker._process is not None and worker._process.pid != worker.pid:
                pids.append(worker._process.pid)
    return pids


async def fifty_plugins(scratch: Path) -> tuple[float, float]:
    names = ["bench"] + [f"bench{i}" for i in range(1, 50)]
    config = write_config(scratch, names)
    host = Host(config)
    started = time.perf_counter()
    await host.start()
    elapsed = time.perf_counter() - started
    ready = sum(s.state == "ready" for s in host.plugins.values())
    pids = plugin_pids(host)
    total = psutil.Process().memory_info().rss + sum(psutil.Process(p).memory_full_info().uss for p in pids)
    await host.stop()
    assert ready == 50, f"only {ready} of 50 plugins started"
    return elapsed * 1000, total / 2**20


async def blob_rate(contender) -> float:
    await contender.blob()
    started = time.perf_counter()
    result = await contender.blob()
    assert len(result) == BLOB
    return BLOB / (time.perf_counter() - started) / 2**20


# ---- the run ------------------------------------------------------------------------------------

async def measure(quick: bool) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="qanot-bench-"))
    n_lat, n_tp, reps = (200, 400, 3) if quick else (5000, 10000, 10)
    makers = {"a": InProcess, "b": BarePipe, "c1": MultiprocessingPool, "c2": ProcessPool, "d": Mcp,
              "e": lambda: QanotHost(scratch)}
    results: dict[str, dict] = {key: {} for key in makers}
    try:
        for key, make in makers.items():
            slow = key == "d"  # MCP is orders of magnitude slower: fewer calls, same figures
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
            r["blob_mbs"] = await blob_rate(contender)
            await contender.stop()
            if key != "a":
                contender = make()
                await contender.start(4)
                r["tp64x4"] = await throughput(contender, 64, n_tp // 10 if slow else n_tp)
                await contender.stop()
                if key != "e":
                    r["cold_ms"] = await cold_start(make, 2 if slow or quick else reps)
            print(f"  measured {r['label']}", file=sys.stderr)
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
              f"- cold start: e is {d['cold_ms'] / e['cold_ms']:.1f}× faster than d"]
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
