"""What is measured of a contender, and the figures only qanot-host has (cold start, restart,
sandbox cost, CPU share, 50 plugins)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path

import psutil

from contenders import BLOB, QanotHostOn, plugin_pids, write_config
from qanot_host import Host, load_config


async def latency(contender, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await contender.call()
        samples.append(time.perf_counter() - started)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def interleaved_p50(contenders: dict, rounds: int, block: int = 100) -> dict[str, float]:
    """Each contender's sequential p50 (µs), measured in alternating blocks of `block` calls so
    that all of them see the same moments of this shared machine: a ratio between two contenders
    measured minutes apart moved by 0.6 between runs here, one measured this way does not."""
    samples: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, contender in contenders.items():
            for _ in range(block):
                started = time.perf_counter()
                await contender.call()
                samples[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) * 1e6 for key, values in samples.items()}


async def throughput(contender, concurrency: int, total: int, trials: int = 5) -> float:
    """Calls per second with `concurrency` calls in flight: the median of `trials` runs, since
    one short run on this shared machine can land on a stall of someone else's."""
    return statistics.median([await _rate(contender, concurrency, total) for _ in range(trials)])


async def interleaved_throughput(contenders: dict, concurrency: int, total: int, rounds: int) -> dict[str, float]:
    """Each contender's calls per second (the median of `rounds` runs), their runs alternating so
    that all of them see the same minutes of this shared machine: measured minutes apart, b's own
    figure moved from 294k to 343k calls/s within an hour here, and the ratio to it with it."""
    rates: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(rounds):
        for key, contender in contenders.items():
            rates[key].append(await _rate(contender, concurrency, total))
    return {key: statistics.median(values) for key, values in rates.items()}


async def _rate(contender, concurrency: int, total: int) -> float:
    counter = iter(range(total))

    async def loop(k: int) -> None:
        for i in counter:
            await contender.call(i)

    started = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return total / (time.perf_counter() - started)


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


async def blob_rate(contender, times: int = 7) -> float:
    """MB/s of a 10 MB result: the median of `times` calls (one call, on this shared machine, read
    186 MB/s in a run whose neighbours read 330-600)."""
    await contender.blob()
    rates = []
    for _ in range(times):
        started = time.perf_counter()
        result = await contender.blob()
        rates.append(BLOB / (time.perf_counter() - started) / 2**20)
        assert len(result) == BLOB
    return statistics.median(rates)
