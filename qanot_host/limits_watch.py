"""The periodic look at every running plugin: idle time (the supervisor's own check), limits on memory
and CPU (likewise), and its place in the workspace (a walk of what it wrote there, spaced by what the
last one cost). One timer for all plugins, however many there are.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Callable

from .datadirs import workspace_problem
from .disk_growth import DiskGrowth
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
WALK_AT_LEAST_PINGS = 6
# A place whose filesystem has not grown by disk_growth's slack since its last walk is walked again only
# after this long (its plugin's CPU not even read meanwhile)...
QUIET_WALK_MAX = 600.0
# ...and where no filesystem holding places grew since the last look, a plugin is looked at only at its
# turn, one look in QUIET_TURN (a rotation over the plugins), not at every look.
QUIET_TURN = 10


class LimitsWatch:
    def __init__(self, factory: WorkerFactory) -> None:
        self._factory = factory
        self._next_walk: dict[str, float] = {}  # plugin -> when its workspace may be walked again
        # plugin -> (its group's CPU time, the loop's time, how much its filesystem had grown) when its
        # place was last found within
        self._last_within: dict[str, tuple[float | None, float, tuple[int, int] | None]] = {}
        self._disks = DiskGrowth()
        self._looks = 0
        self._listed: list[PluginSupervisor] = []
        self._every_look: list[PluginSupervisor] = []
        self._placed: list[PluginSupervisor] = []
        self._owners: dict[str, PluginSupervisor] = {}  # name -> the supervisor its walk state is of
        self._places_seen = 0
        self._idle_walked: set[str] = set()  # lazy plugins not started by this host, their place measured

    async def run(self, plugins: Callable[[], list[PluginSupervisor]], interval: Callable[[], float]) -> None:
        """Until cancelled (the host's stop): every `interval()` seconds, the plugins whose look is
        due; the workspace walks that are due, all in one thread hop. A plugin is asked only what
        applies to it (no idle_timeout: no idle check; no memory or CPU ceiling: no usage read), and
        where no filesystem holding places grew, only the plugins at their turn are looked at: a look
        at each of 500 plugins every second, though it asked nothing, was 0.6% of a core (side by
        side, 2026-11-27: 1.12% with it, 0.50% without)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval())
            now, loop_now = time.monotonic(), loop.time()
            self._disks.look()
            self._looks += 1
            self._sort(plugins())
            fresh = self._watch_new_places()
            for supervisor in self._every_look:
                if supervisor.idle_timeout is not None:
                    supervisor.stop_if_idle(now)
                if supervisor.limits.max_rss_mb or supervisor.limits.max_cpu_seconds:
                    supervisor.check_limits()
            turn = -self._looks % QUIET_TURN
            placed = self._placed
            everyone = fresh or self._disks.grew_anywhere()
            looked = (((s, i % QUIET_TURN == turn) for i, s in enumerate(placed)) if everyone
                      else ((s, True) for s in placed[turn::QUIET_TURN]))
            due: list[tuple[PluginSupervisor, float | None]] = []
            for supervisor, at_turn in looked:
                walk, cpu = self._walk_due(supervisor, loop_now, at_turn)
                if walk:
                    due.append((supervisor, cpu))
            if due:
                await self._check_workspaces(due)

    def _sort(self, supervisors: list[PluginSupervisor]) -> None:
        """The plugins with an idle_timeout or a memory or CPU ceiling (looked at every time), and
        those with a workspace_mb (at their turn, or every time where a filesystem grew): sorted
        again only when the list of plugins is another (compared by identity, touching none)."""
        if supervisors == self._listed:
            return
        self._listed = supervisors
        self._every_look = [s for s in supervisors if s.idle_timeout is not None or s.limits.max_rss_mb
                            or s.limits.max_cpu_seconds]
        self._placed = [s for s in supervisors if s.limits.workspace_mb]
        for name in [name for name, owner in self._owners.items() if owner not in supervisors]:
            # a plugin removed, or made anew by a reload: nothing of its last walk is its successor's
            del self._owners[name]
            self._last_within.pop(name, None)
            self._next_walk.pop(name, None)
            self._idle_walked.discard(name)
        self._owners.update((s.name, s) for s in supervisors)

    def _watch_new_places(self) -> bool:
        """Places made since the last look (a lazy plugin's, at its first start) are watched from now
        on, and this look goes to every plugin: a new place was looked at only at its plugin's turn,
        up to QUIET_TURN looks after its start (the review of 11-27). True if there were any."""
        workspaces = self._factory.workspaces
        if len(workspaces) == self._places_seen:  # places are only ever added
            return False
        self._places_seen = len(workspaces)
        return self._disks.watch(workspaces.values())

    def _walk_due(self, supervisor: PluginSupervisor, now: float, turn: bool) -> tuple[bool, float | None]:
        """workspace_mb. A walk costs the host CPU in proportion to what the plugin put there (100 000
        empty files: a third of a core, walked every second), so a plugin's next walk waits at least
        WORKSPACE_WALK_SPACING times as long as its last one took: at most ~5% of a core each. And a
        plugin that has not run since its place was last found within its ceiling cannot have written
        there (its cgroup counts every process of it): no walk; one that ran for less than WALK_CPU,
        as answering pings takes, every WALK_AT_LEAST_PINGS ping intervals (measured: 200 plugins, 37%
        of a core walked every second; at every ping, 1.5%). Nor one whose filesystem has not grown
        by the slack since its last walk, for up to QUIET_WALK_MAX, nor one whose filesystem did not
        grow since the last look unless it is its `turn`: its CPU is not even read (disk_growth.py).
        Returns whether to walk, and the group's CPU time read for that (None: no cgroups)."""
        name = supervisor.name
        if supervisor.state is not PluginState.READY:
            # RESTARTING with its worker still there: a recycle draining its calls, which may write on
            worker = supervisor.worker
            if supervisor.state is PluginState.IDLE and worker is None and name not in self._last_within \
                    and name not in self._idle_walked and turn:
                # a lazy plugin this host has not started: what an earlier host's worker left there
                # (its teardown() at that host's stop: attack pass 63) is measured once, at its turn
                self._idle_walked.add(name)
                return self._factory.place_of(name) is not None, None
            if supervisor.state is not PluginState.RESTARTING or worker is None or worker.exited.done():
                return False, None
        place = self._factory.workspaces.get(name)
        if now < self._next_walk.get(name, 0.0) or not place:
            return False, None
        if not self._disks.may_have_grown(place) and not turn:  # asked first: a place not seen is watched
            return False, None
        last = self._last_within.get(name)
        if last is not None:
            grown, then = self._disks.grown(place), last[2]
            if grown is not None and then is not None and not DiskGrowth.grown_by_slack(grown, then) \
                    and now - last[1] < QUIET_WALK_MAX:
                return False, None  # its filesystem has not grown by the slack since its last walk
        cgroups = self._factory.cgroups
        cpu = cgroups.cpu_seconds(name) if cgroups.available else None
        if cpu is None or last is None or last[0] is None:
            return True, cpu
        used = cpu - last[0]
        if used >= WALK_CPU:
            return True, cpu
        return used > 0 and now - last[1] >= WALK_AT_LEAST_PINGS * supervisor.config.host.ping_interval, cpu

    async def _check_workspaces(self, due: list[tuple[PluginSupervisor, float | None]]) -> None:
        measure = [(s.name, self._factory.place_of(s.name) or "", s.limits.workspace_mb or 0) for s, _ in due]
        pids = {s.name: plugin_pids(self._factory, s) for s, _ in due}
        found = await asyncio.to_thread(_measure_all, measure, pids)
        now = asyncio.get_running_loop().time()
        for (supervisor, cpu), (problem, seconds) in zip(due, found, strict=True):
            self._next_walk[supervisor.name] = now + WORKSPACE_WALK_SPACING * seconds
            if problem and supervisor.state is PluginState.IDLE and supervisor.worker is None:
                supervisor.place_full(problem)  # no worker to kill: it fails, as its start would
            elif problem:
                self._last_within.pop(supervisor.name, None)
                # killed at once: the host's own disk, which a teardown() of seconds went on filling
                # (attack pass 49: caught at 655 MB of 256, 1.7 GB by the end of its teardown)
                supervisor.recycle(f"its place in the workspace is full: {problem}", counts=True, at_once=True)
            elif supervisor.name in self._factory.workspaces:
                place = self._factory.workspaces[supervisor.name]
                self._last_within[supervisor.name] = (cpu, now, self._disks.grown(place))


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
