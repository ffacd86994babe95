"""The periodic look at every running plugin: idle time (the supervisor's own check), limits on memory
and CPU (likewise), and its place in the workspace (a walk of what it wrote there, spaced by what the
last one cost). One timer for all plugins, however many there are.
"""

from __future__ import annotations

import array
import asyncio
import os
import time
from typing import TYPE_CHECKING, Callable

from .datadirs import workspace_problem
from .supervisor import PluginState, PluginSupervisor

if TYPE_CHECKING:
    from .worker_factory import WorkerFactory

__all__ = ["LimitsWatch", "plugin_pids", "WORKSPACE_WALK_SPACING"]

WORKSPACE_WALK_SPACING = 20  # a workspace walk is followed by 20 times its length without one
# A plugin's place is walked again once its cgroup has used WALK_CPU seconds since the last walk, or
# when it has used any and WALK_AT_LEAST_PINGS ping intervals have gone by: answering the host's pings
# costs an idle plugin ~0.2 ms of CPU each, which alone set off a walk (/proc maps read included) every
# ping_interval for every plugin: 500 idle plugins, 50 walks a second, 3-4% of a core.
WALK_CPU = 0.002
WALK_CPU_NS = int(WALK_CPU * 1e9)
WALK_AT_LEAST_PINGS = 6
NEVER_WALKED = -WALK_CPU_NS  # a CPU time that makes any plugin's look due


class LimitsWatch:
    def __init__(self, factory: WorkerFactory) -> None:
        self._factory = factory
        self._next_walk: dict[str, float] = {}  # plugin -> when its workspace may be walked again
        # plugin -> (its group's CPU time, the loop's time) when its place was last found within
        self._last_within: dict[str, tuple[float, float]] = {}
        self._generation = -1  # of the host's plugins, when the lists below were made
        self._looked: list[PluginSupervisor] = []  # an idle_timeout or a ceiling: looked at each time
        self._probe = CpuProbe()  # those with a workspace_mb, by their cgroups' CPU time

    async def run(self, plugins: Callable[[], list[PluginSupervisor]], interval: Callable[[], float],
                  generation: Callable[[], int] = lambda: 0) -> None:
        """Until cancelled (the host's stop): every `interval()` seconds, each plugin that needs a
        look; the workspace walks that are due, all in one thread hop. A plugin is asked only what
        applies to it (no idle_timeout: no idle check; no memory or CPU ceiling: no usage read), and
        a plugin whose cgroup has not run is not looked at at all: its CPU time, read from a
        descriptor kept open, says so (CpuProbe). `generation()` changes when the plugins do."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(interval())
                if generation() != self._generation:
                    self.take(plugins(), generation())
                now, loop_now = time.monotonic(), loop.time()
                for supervisor in self._looked:
                    if supervisor.idle_timeout is not None:
                        supervisor.stop_if_idle(now)
                    limits = supervisor.limits
                    if limits.max_rss_mb or limits.max_cpu_seconds:
                        supervisor.check_limits()
                due: list[tuple[PluginSupervisor, float | None]] = []
                for supervisor in self._probe.moved(loop_now):
                    walk, cpu = self._walk_due(supervisor, loop_now)
                    if walk:
                        due.append((supervisor, cpu))
                if due:
                    await self._check_workspaces(due)
        finally:
            self._probe.close()

    def take(self, supervisors: list[PluginSupervisor], generation: int) -> None:
        """Look at these plugins from now on (the host calls it once started, before its first
        tick: the descriptors it keeps are the host's from its start on, as a chaos run counts them)."""
        self._generation = generation
        self._looked = [s for s in supervisors if s.idle_timeout is not None
                        or s.limits.max_rss_mb or s.limits.max_cpu_seconds]
        cgroups = self._factory.cgroups
        gap = supervisors[0].config.host.ping_interval * WALK_AT_LEAST_PINGS if supervisors else 60.0
        self._probe.rebuild([s for s in supervisors if s.limits.workspace_mb],
                            cgroups.cpu_file if cgroups.available else None, gap)

    def _walk_due(self, supervisor: PluginSupervisor, now: float) -> tuple[bool, float | None]:
        """workspace_mb. A walk costs the host CPU in proportion to what the plugin put there (100 000
        empty files: a third of a core, walked every second), so a plugin's next walk waits at least
        WORKSPACE_WALK_SPACING times as long as its last one took: at most ~5% of a core each. And a
        plugin that has not run since its place was last found within its ceiling cannot have written
        there (its cgroup counts every process of it): no walk; one that ran for less than WALK_CPU,
        as answering pings takes, every WALK_AT_LEAST_PINGS ping intervals (measured: 200 plugins, 37%
        of a core walked every second; at every ping, 1.5%).
        Returns whether to walk, and the group's CPU time read for that (None: no cgroups)."""
        name = supervisor.name
        if supervisor.state is not PluginState.READY:
            # RESTARTING with its worker still there: a recycle draining its calls, which may write on
            worker = supervisor.worker
            if supervisor.state is not PluginState.RESTARTING or worker is None or worker.exited.done():
                return False, None
        if now < self._next_walk.get(name, 0.0) or not self._factory.workspaces.get(name):
            return False, None
        cgroups = self._factory.cgroups
        cpu = cgroups.cpu_seconds(name) if cgroups.available else None
        last = self._last_within.get(name)
        if cpu is None or last is None:
            return True, cpu
        used = cpu - last[0]
        if used >= WALK_CPU:
            return True, cpu
        return used > 0 and now - last[1] >= WALK_AT_LEAST_PINGS * supervisor.config.host.ping_interval, cpu

    async def _check_workspaces(self, due: list[tuple[PluginSupervisor, float | None]]) -> None:
        measure = [(s.name, self._factory.workspaces[s.name], s.limits.workspace_mb or 0) for s, _ in due]
        pids = {s.name: plugin_pids(self._factory, s) for s, _ in due}
        found = await asyncio.to_thread(_measure_all, measure, pids)
        now = asyncio.get_running_loop().time()
        for (supervisor, cpu), (problem, seconds) in zip(due, found, strict=True):
            self._next_walk[supervisor.name] = now + WORKSPACE_WALK_SPACING * seconds
            self._probe.walked(supervisor, None if problem else cpu, now)
            if problem:
                self._last_within.pop(supervisor.name, None)
                # killed at once: the host's own disk, which a teardown() of seconds went on filling
                # (attack pass 49: caught at 655 MB of 256, 1.7 GB by the end of its teardown)
                supervisor.recycle(f"its place in the workspace is full: {problem}", counts=True, at_once=True)
            elif cpu is not None:
                self._last_within[supervisor.name] = (cpu, now)


class CpuProbe:
    """Which plugins' cgroups have run since their places were last walked: each plugin's CPU time
    read from a descriptor kept open, compared in arrays, without touching the plugin's objects.
    Waking after a second asleep, this machine made the host pay 40-50 us for each page of memory it
    wrote again (a Python object's reference count is written on any use), so a look at every one
    of 500 plugins each second, a few pages each, cost a few percent of a core at idle. A plugin is
    taken up only when its cgroup has used WALK_CPU since its last walk, or used any and its
    WALK_AT_LEAST_PINGS ping intervals are up (as _walk_due decides again), or its time cannot be
    read (no cgroups here, its group not made yet, a read failing)."""

    def __init__(self) -> None:
        self._supervisors: list[PluginSupervisor] = []
        self._index: dict[PluginSupervisor, int] = {}
        self._cpu_file: Callable[[str], tuple[str, bool]] | None = None
        self._fds = array.array("i")
        self._v2 = array.array("b")  # cpu.stat (usage_usec) rather than cpuacct.usage (ns)
        self._at_walk = array.array("q")  # ns of CPU time when its place was last found within
        self._walked_at = array.array("d")  # the loop's time then
        self._gap = 60.0

    def rebuild(self, supervisors: list[PluginSupervisor], cpu_file: Callable[[str], tuple[str, bool]] | None,
                gap: float) -> None:
        """For these plugins from now on (what was known of those still among them is kept)."""
        known = {s: (self._at_walk[i], self._walked_at[i]) for s, i in self._index.items()}
        self.close()
        self._gap, self._cpu_file = gap, cpu_file
        self._supervisors = list(supervisors)
        self._index = {s: i for i, s in enumerate(self._supervisors)}
        for supervisor in self._supervisors:
            self._v2.append(False)
            self._fds.append(-1)
            at_walk, walked_at = known.get(supervisor, (NEVER_WALKED, 0.0))
            self._at_walk.append(at_walk)
            self._walked_at.append(walked_at)
        for i in range(len(self._supervisors)):  # now, not at the first look (those not yet made: then)
            self._open(i)

    def moved(self, now: float) -> list[PluginSupervisor]:
        fds, at_walk, walked_at, gap, v2 = self._fds, self._at_walk, self._walked_at, self._gap, self._v2
        taken = []
        for i in range(len(fds)):
            fd = fds[i]
            if fd < 0:
                fd = self._open(i)
                if fd < 0:
                    taken.append(self._supervisors[i])
                    continue
            try:
                data = os.pread(fd, 64, 0)
                used = (int(data.split(None, 2)[1]) * 1000 if v2[i] else int(data)) - at_walk[i]
            except (OSError, ValueError, IndexError):
                taken.append(self._supervisors[i])
                continue
            if used >= WALK_CPU_NS or (used > 0 and now - walked_at[i] >= gap):
                taken.append(self._supervisors[i])
        return taken

    def walked(self, supervisor: PluginSupervisor, cpu: float | None, now: float) -> None:
        """Its place was walked: found within at `cpu` seconds of its group's time, or not (None)."""
        i = self._index.get(supervisor)
        if i is not None:
            self._at_walk[i] = NEVER_WALKED if cpu is None else int(cpu * 1e9)
            self._walked_at[i] = now

    def _open(self, i: int) -> int:
        path, v2 = self._cpu_file(self._supervisors[i].name) if self._cpu_file is not None else ("", False)
        if not path:
            return -1
        try:
            self._fds[i] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # its group is not made yet (a lazy plugin never started)
            return -1
        self._v2[i] = v2
        return self._fds[i]

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._supervisors, self._index = [], {}
        for column in (self._fds, self._v2, self._at_walk, self._walked_at):
            del column[:]


def _measure_all(measure: list[tuple[str, str, int]], pids: dict[str, list[int]]) -> list[tuple[str | None, float]]:
    """(problem, seconds the walk took) for each plugin."""
    found = []
    for name, place, limit in measure:
        began = time.monotonic()
        problem = workspace_problem(place, limit, pids[name])
        found.append((problem, time.monotonic() - began))
    return found


def plugin_pids(factory: WorkerFactory, supervisor: PluginSupervisor) -> list[int]:
    """The plugin's processes: its cgroup's members where it has one, else its worker's tree."""
    if factory.cgroups.available:
        return factory.cgroups.members(supervisor.name)
    return supervisor.worker.processes() if supervisor.worker is not None else []
