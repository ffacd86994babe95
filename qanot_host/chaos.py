"""`qanot-host chaos`: concurrent calls at every plugin while workers are SIGKILLed at random.

Crash recovery as something an operator can run and read: every call must end (a result or a
typed error) within its timeout plus one second, every plugin must be healthy afterwards, and no
process or file descriptor may be left behind.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from .config import load_config
from .errors import QanotHostError
from .host import Host
from .settings import RestartSettings
from .supervisor import SERVING_STATES, PluginState, PluginSupervisor

__all__ = ["ChaosReport", "run_chaos", "sample_params"]

# What "hung" means: a call still running this long after its own timeout.
HANG_MARGIN = 1.0
FD_SETTLE_SECONDS = 5.0  # what the last workers' pipes may take to close before they count as leaked
SAMPLE_VALUES = {"string": "x", "integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}


@dataclass
class ChaosReport:
    calls: int = 0
    ok: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    hung: int = 0
    kills: int = 0
    recoveries_ms: list[float] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    leaked_processes: int = 0
    leaked_fds: int = 0
    seconds: float = 0.0  # of calls and kills: the host's start is not counted
    kills_expected: bool = True  # --kill-every fits in --duration

    def problems(self) -> list[str]:
        """Why it did not pass. A run that exercised nothing (no call answered, no worker killed:
        a start that took the whole duration, say) does not pass either."""
        found = []
        if not self.ok:
            found.append("no call succeeded")
        if self.kills_expected and not self.kills:
            found.append("no worker was killed")
        if self.hung:
            found.append(f"{self.hung} calls hung")
        if self.unhealthy:
            found.append("plugins unhealthy after")
        if self.leaked_processes or self.leaked_fds:
            found.append("processes or fds leaked")
        return found

    def percentile(self, q: float) -> float:
        if not self.recoveries_ms:
            return float("nan")
        ordered = sorted(self.recoveries_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def passed(self) -> bool:
        return not self.problems()

    def render(self) -> str:
        errors = ", ".join(f"{kind} {count}" for kind, count in self.errors.most_common()) or "none"
        median = statistics.median(self.recoveries_ms) if self.recoveries_ms else float("nan")
        lines = [
            f"calls            {self.calls} in {self.seconds:.1f} s ({self.calls / max(self.seconds, 1e-9):.0f}/s)",
            f"succeeded        {self.ok}",
            f"typed errors     {errors}",
            f"hung             {self.hung}",
            f"workers killed   {self.kills}",
            f"recovery (kill to ready) p50 {median:.1f} ms, p99 {self.percentile(0.99):.1f} ms, "
            f"max {max(self.recoveries_ms, default=float('nan')):.1f} ms",
            f"unhealthy after  {', '.join(self.unhealthy) or 'none'}",
            f"leaked processes {self.leaked_processes}",
            f"leaked fds       {self.leaked_fds}",
            "PASS" if self.passed() else f"FAIL: {'; '.join(self.problems())}",
        ]
        return "\n".join(lines)


def sample_params(schema: dict[str, Any]) -> dict[str, Any]:
    """Params that satisfy a tool's required keys, from their JSON types."""
    properties = schema.get("properties") or {}
    params = {}
    for key in schema.get("required", ()):
        kind = (properties.get(key) or {}).get("type", "string")
        if isinstance(kind, list):  # the first of its types; none (`[]`, which passes anything): a string
            kind = kind[0] if kind else "string"
        params[key] = SAMPLE_VALUES.get(kind, "x")
    return params


async def run_chaos(config_path: str, duration: float, kill_every: float, concurrency: int = 32,
                    max_calls: int | None = None, keep_restart_policy: bool = False,
                    tools: list[str] | None = None) -> ChaosReport:
    config = load_config(config_path)
    if not keep_restart_policy:
        # Kills every few hundred ms would exhaust any sane restart intensity: chaos measures
        # recovery, so it lifts the limit (and the backoff) unless told otherwise.
        unlimited = RestartSettings(max_restarts=10**9, backoff_initial=0.0, backoff_max=0.0)
        config.host.restart = unlimited
        for settings in config.host.plugins.values():
            settings.restart = None
    me = psutil.Process()
    report = ChaosReport(kills_expected=0 < kill_every < duration)
    async with Host(config) as host:
        # Measured with every worker up, and compared with the same state after the chaos: the
        # event loop keeps a few descriptors of its own from the first spawn on.
        fds_before = me.num_fds()
        names = [n for n in host.registry.tool_names if _plugin_of(host, n)] if tools is None else tools
        if not names:
            raise QanotHostError("chaos: no plugin tools are registered")
        strangers = [n for n in names if not _plugin_of(host, n)]
        if strangers:
            raise QanotHostError(f"chaos: {', '.join(strangers)} is not a plugin's tool")
        started = time.monotonic()
        deadline = started + duration
        budget = [max_calls if max_calls is not None else float("inf")]
        await asyncio.gather(
            *(_caller(host, names, deadline, budget, report) for _ in range(concurrency)),
            _killer(host, deadline, budget, kill_every, report))
        report.seconds = time.monotonic() - started
        await _settle(host, report)
        # Every killed worker's exit was awaited; the loop closes their pipes' transports a few turns
        # later, and nothing signals that: the count is read until it is back, for FD_SETTLE_SECONDS.
        # The fewest seen is what counts: the limits watcher's thread holds a /proc file open for a
        # moment each second, and a read that lands then is one too many (CI saw 1).
        leaked = me.num_fds() - fds_before
        for _ in range(int(FD_SETTLE_SECONDS / 0.05)):
            if leaked <= 0:
                break
            await asyncio.sleep(0.05)
            leaked = min(leaked, me.num_fds() - fds_before)
        report.leaked_fds = max(0, leaked)
    report.leaked_processes = len([c for c in me.children(recursive=True) if _alive(c)])
    return report


def _plugin_of(host: Host, name: str) -> str | None:
    tool = host.registry.get(name)
    return tool.plugin if tool is not None else None


async def _caller(host: Host, names: list[str], deadline: float, budget: list, report: ChaosReport) -> None:
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        name = random.choice(names)
        tool = host.registry.get(name)
        report.calls += 1
        if tool is None or tool.plugin is None:  # gone since (a restarted plugin that offers other tools)
            report.errors["ToolNotFound"] += 1
            await asyncio.sleep(0)
            continue
        limit = host.config.call_timeout(tool.plugin, name) + HANG_MARGIN
        try:
            await asyncio.wait_for(host.registry.invoke(name, sample_params(tool.parameters)), limit)
            report.ok += 1
        except asyncio.TimeoutError:
            report.hung += 1
        except QanotHostError as exc:
            report.errors[type(exc).__name__] += 1


async def _killer(host: Host, deadline: float, budget: list, every: float, report: ChaosReport) -> None:
    recoveries = []
    # Kills at fixed moments (every, 2 * every, ...) before the deadline, never one past it. A sleep
    # until the deadline itself could wake a fraction of a millisecond early by time.monotonic() (the
    # loop's clock ticks in milliseconds) and the next sleeps were ~0: 33 kills in the last instant
    # of a run whose --kill-every was longer than its --duration.
    next_kill = time.monotonic() + every
    while 0 < every and next_kill < deadline:  # --kill-every 0 (or less): no kills
        await asyncio.sleep(max(0.0, next_kill - time.monotonic()))
        next_kill += every
        if budget[0] <= 0:
            break
        ready = [s for s in host.plugins.values() if s.state == PluginState.READY and s.worker]
        if ready:
            recoveries.append(asyncio.ensure_future(_kill_and_time(random.choice(ready), report)))
    await asyncio.gather(*recoveries)


async def _kill_and_time(supervisor: PluginSupervisor, report: ChaosReport) -> None:
    worker = supervisor.worker
    if worker is None or worker.pid is None or worker.exited.done():
        return
    killed_at = time.monotonic()
    try:
        os.kill(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    report.kills += 1
    await worker.exited
    await supervisor.settled.wait()
    if supervisor.state == PluginState.READY:
        report.recoveries_ms.append(1000 * (time.monotonic() - killed_at))


async def _settle(host: Host, report: ChaosReport, timeout: float = 10.0) -> None:
    try:  # settled: neither starting nor restarting (ready, or failed for good)
        await asyncio.wait_for(asyncio.gather(*(s.settled.wait() for s in host.plugins.values())), timeout)
    except asyncio.TimeoutError:
        pass
    # idle is healthy: a lazy plugin, or one stopped for want of calls, that a call starts
    report.unhealthy = [f"{s.name} ({s.state})" for s in host.plugins.values() if s.state not in SERVING_STATES]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
