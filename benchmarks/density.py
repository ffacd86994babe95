"""Density: hundreds of sandboxed plugins on one machine, and plugins that cost nothing while idle.

    python benchmarks/density.py            # 500 eager, 2000 lazy (a few minutes on 2 cores)
    python benchmarks/density.py --quick    # 60 eager, 200 lazy; CI runs this so it never rots

Every figure beside its baseline from the same run: the one-plugin host. Writes
benchmarks/results/density.md. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from qanot_worker import eventloop  # noqa: E402

from contenders import PARAMS, write_config  # noqa: E402
from qanot_host import Host  # noqa: E402
from qanot_host.fd_limit import FDS_PER_WORKER, RESERVED_FDS  # noqa: E402


def names(n: int) -> list[str]:
    return ["bench"] + [f"bench{i}" for i in range(1, n)]


def configure(scratch: Path, n: int, **host: object) -> str:
    scratch.mkdir(parents=True, exist_ok=True)
    path = write_config(scratch, names(n))
    data = json.loads(Path(path).read_text())
    data["host"].update(host)
    Path(path).write_text(json.dumps(data))
    return path


def worker_memory(host: Host) -> float:
    """USS of every process of every plugin (the worker and its namespace's init), MB."""
    total = 0
    for supervisor in host.plugins.values():
        worker = supervisor.worker
        if worker is None or worker.pid is None:
            continue
        try:
            root = psutil.Process(worker.pid)
            procs = [root, *root.children(recursive=True)]
            parent = root.parent()
            if parent is not None and parent.name() == root.name():
                procs.append(parent)  # the init of its PID namespace
            total += sum(proc.memory_full_info().uss for proc in procs)
        except psutil.Error:
            continue
    return total / 2**20


async def call_p50(host: Host, n: int) -> float:
    for _ in range(50):
        await host.registry.execute("bench_echo", PARAMS)
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        await host.registry.execute("bench_echo", PARAMS)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e6


async def idle_cpu(seconds: float) -> float:
    """The host process's CPU over `seconds` of doing nothing, in % of one core, after as long again
    to settle (the first look at every plugin's workspace, the first pings)."""
    await asyncio.sleep(seconds)
    me = psutil.Process()
    before = me.cpu_times()
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    after = me.cpu_times()
    return 100 * ((after.user + after.system) - (before.user + before.system)) / (time.perf_counter() - began)


async def started(config: str) -> tuple[Host, float]:
    """A host of `config`, started (the caller stops it), and the seconds its start took."""
    host = Host(config)
    began = time.perf_counter()
    await host.start()
    return host, time.perf_counter() - began


async def eager(scratch: Path, n: int, calls: int, idle_seconds: float) -> dict:
    figures: dict = {"n": n}
    config = configure(scratch / "one", 1)
    async with Host(config) as host:
        await call_p50(host, calls)  # the process's first host: warms what every later one reuses
    async with Host(config) as host:
        figures["one_p50_us"] = await call_p50(host, calls)
        figures["one_mb"] = psutil.Process().memory_info().rss / 2**20 + worker_memory(host)
        figures["one_idle_cpu"] = await idle_cpu(idle_seconds)
    host, figures["ready_s"] = await started(configure(scratch / "many", n))
    try:
        figures["ready"] = sum(s.state == "ready" for s in host.plugins.values())
        figures["host_mb"] = psutil.Process().memory_info().rss / 2**20
        figures["workers_mb"] = worker_memory(host)
        figures["idle_cpu"] = await idle_cpu(idle_seconds)
        figures["p50_us"] = await call_p50(host, calls)
        figures["fds"] = psutil.Process().num_fds()
        figures["fd_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        began = time.perf_counter()
        await host.stop()
        figures["stop_s"] = time.perf_counter() - began
    return figures


async def lazy(scratch: Path, n: int, first_calls: int) -> dict:
    figures: dict = {"n": n}
    config = configure(scratch / "lazy", n, activation="lazy")
    began = time.perf_counter()
    async with Host(config):  # no cached tool lists yet: each plugin is started once to list its tools
        figures["cold_s"] = time.perf_counter() - began
    rss_before = psutil.Process().memory_info().rss
    host, figures["warm_s"] = await started(config)
    try:
        figures["idle"] = sum(s.state == "idle" for s in host.plugins.values())
        figures["host_mb"] = psutil.Process().memory_info().rss / 2**20
        figures["host_growth_mb"] = (psutil.Process().memory_info().rss - rss_before) / 2**20
        samples, setups = [], []
        for name in names(n)[1:first_calls + 1]:
            tool = f"{name}_echo"
            began = time.perf_counter()
            await host.registry.execute(tool, PARAMS)
            samples.append(time.perf_counter() - began)
            setups.append(host.plugins[name].worker.start_seconds)
        figures["first_call_ms"] = statistics.median(samples) * 1000
        figures["worker_start_ms"] = statistics.median(setups) * 1000
        figures["warm_call_us"] = await call_p50(host, 200)
    finally:
        await host.stop()
    return figures


async def deps(scratch: Path, n: int) -> dict:
    """n plugins needing aiohttp: environments built from uv's warm cache, offline (the first host,
    online, warms it); each one's start and the disk each environment adds (files not shared with
    uv's cache or another environment)."""
    figures: dict = {"n": n}
    plugins_dir = scratch / "deps" / "plugins"
    names = [f"dep{i}" for i in range(n)]
    code = (HERE / "plugins" / "bench" / "plugin.py").read_text()
    for name in names:
        (plugins_dir / name).mkdir(parents=True, exist_ok=True)
        (plugins_dir / name / "plugin.json").write_text(json.dumps({"dependencies": ["aiohttp"]}))
        (plugins_dir / name / "plugin.py").write_text(code.replace('"bench_', f'"{name}_').replace(
            'name = "bench"', f'name = "{name}"'))
    base = {"plugins": [{"name": names[0]}], "plugins_dir": str(plugins_dir),
            "workspace_dir": str(scratch / "deps" / "workspace"), "host": {"state_dir": str(scratch / "deps" / "warm")}}
    warm = scratch / "deps" / "warm.json"
    warm.write_text(json.dumps(base))
    async with Host(str(warm)) as host:  # online: uv's cache gets aiohttp and what it needs
        if host.plugins[names[0]].state != "ready":
            return {"n": n, "error": host.plugins[names[0]].error[:200]}
    config = scratch / "deps" / "config.json"
    config.write_text(json.dumps({**base, "plugins": [{"name": name} for name in names],
                                  "host": {"state_dir": str(scratch / "deps" / "state"), "offline": True}}))
    async with Host(str(config)) as host:
        ready = [s for s in host.plugins.values() if s.state == "ready"]
        figures["ready"] = len(ready)
        installs = host.install_seconds()
        figures["first_start_ms"] = statistics.median(
            1000 * (installs.get(s.name, 0.0) + s.worker.start_seconds) for s in ready if s.worker)
    envs = [env for env in (scratch / "deps" / "state" / "envs").glob("dep*-*") if env.is_dir()]
    figures["own_mb"] = statistics.median(_own_bytes(env) for env in envs) / 2**20
    # The first start of one such plugin alone (a host of its own, nothing new in uv's cache): the
    # figure the target names; the median above is of n starting at once on two cores.
    alone = []
    for trial in range(3):
        config.write_text(json.dumps({**base, "host": {"state_dir": str(scratch / "deps" / f"alone{trial}"),
                                                       "offline": True}}))
        async with Host(str(config)) as host:
            supervisor = host.plugins[names[0]]
            if supervisor.state == "ready" and supervisor.worker:
                alone.append(1000 * (host.install_seconds().get(names[0], 0.0) + supervisor.worker.start_seconds))
    figures["alone_ms"] = statistics.median(alone) if alone else float("nan")
    return figures


def _own_bytes(env: Path) -> int:
    """Blocks of the files only this environment has (a file hard-linked from uv's cache is shared)."""
    total = 0
    for root, _, files in os.walk(env):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


def render(e: dict, z: dict, quick: bool, d: dict | None = None) -> str:
    room = (e["fd_limit"] - RESERVED_FDS) // FDS_PER_WORKER
    lines = [
        f"# Density ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} cores, sandbox on)",
        "",
        "| figure | one plugin (baseline) | many plugins | target (full run) |",
        "|---|---|---|---|",
        f"| eager plugins ready | 1 | {e['ready']} of {e['n']} in {e['ready_s']:.2f} s | 500 in <= 6 s |",
        f"| host RSS + workers' USS | {e['one_mb']:.0f} MB | {e['host_mb'] + e['workers_mb']:.0f} MB "
        f"(host {e['host_mb']:.0f} MB) | <= 3 GB |",
        f"| host CPU while idle | {e['one_idle_cpu']:.1f}% of a core | {e['idle_cpu']:.1f}% of a core | <= 2% |",
        f"| sequential call p50 | {e['one_p50_us']:.0f} us | {e['p50_us']:.0f} us "
        f"({e['p50_us'] / e['one_p50_us']:.2f}x) | <= 1.1x |",
        f"| host descriptors | | {e['fds']} (limit {e['fd_limit']}: room for ~{room} workers) | |",
        f"| host stop | | {e['stop_s']:.2f} s | |",
        f"| lazy plugins, cold tool cache | | {z['n']} listed in {z['cold_s']:.2f} s | |",
        f"| lazy plugins, warm tool cache | | {z['idle']} of {z['n']} ready (idle) in {z['warm_s']:.2f} s, "
        f"host {z['host_mb']:.0f} MB | 2000 in <= 2 s, <= 300 MB |",
        f"| first call to a cold lazy plugin, p50 | warm call {z['warm_call_us']:.0f} us | "
        f"{z['first_call_ms']:.1f} ms (its worker's start, setup() included: {z['worker_start_ms']:.1f} ms) | "
        "<= 30 ms over setup() |",
    ]
    if d and "error" in d:
        lines.append(f"| plugins needing aiohttp (uv's warm cache, offline) | | not measured: {d['error']} | |")
    elif d:
        lines.append(f"| plugins needing aiohttp (uv's warm cache, offline) | | first start of one alone p50 "
                     f"{d['alone_ms']:.0f} ms (environment and worker); {d['ready']} of {d['n']} started at once, "
                     f"p50 {d['first_start_ms']:.0f} ms each; each environment's own files {d['own_mb']:.1f} MB | "
                     "<= 300 ms; <= 5 MB each |")
    return "\n".join(lines) + "\n"


async def measure(quick: bool) -> tuple[dict, dict, dict]:
    scratch = Path(tempfile.mkdtemp(prefix="qanot-density-"))
    try:
        e = await eager(scratch, 60 if quick else 500, 300 if quick else 2000, 3.0 if quick else 10.0)
        print("  measured eager", file=sys.stderr)
        z = await lazy(scratch, 200 if quick else 2000, 10 if quick else 50)
        print("  measured lazy", file=sys.stderr)
        d = await deps(scratch, 5 if quick else 50)
        print("  measured dependencies", file=sys.stderr)
        return e, z, d
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer plugins (CI)")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for density.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    e, z, d = eventloop.run(measure(args.quick))
    text = render(e, z, args.quick, d)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("density-quick.md" if args.quick else "density.md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
