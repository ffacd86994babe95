"""The periodic look at every running plugin's limits: memory and CPU (the supervisor's own check),
and its place in the workspace (a walk of what it wrote there, spaced by what the last one cost).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

import psutil

from .datadirs import workspace_problem
from .supervisor import PluginState, PluginSupervisor

if TYPE_CHECKING:
    from .worker_factory import WorkerFactory

__all__ = ["LimitsWatch", "plugin_pids", "WORKSPACE_WALK_SPACING"]

WORKSPACE_WALK_SPACING = 20  # a workspace walk is followed by 20 times its length without one


class LimitsWatch:
    def __init__(self, factory: WorkerFactory) -> None:
        self._factory = factory
        self._next_walk: dict[str, float] = {}  # plugin -> when its workspace may be walked again

    async def run(self, plugins: Callable[[], list[PluginSupervisor]], interval: Callable[[], float]) -> None:
        """Until cancelled (the host's stop): every `interval()` seconds, each plugin in turn."""
        while True:
            await asyncio.sleep(interval())
            for supervisor in plugins():
                supervisor.check_limits()
                await self._check_workspace(supervisor)

    async def _check_workspace(self, supervisor: PluginSupervisor) -> None:
        """workspace_mb. A walk costs the host CPU in proportion to what the plugin put there (100 000
        empty files: a third of a core, walked every second), so a plugin's next walk waits at least
        WORKSPACE_WALK_SPACING times as long as its last one took: at most ~5% of a core each."""
        place = self._factory.workspaces.get(supervisor.name)
        limit = supervisor.limits.workspace_mb
        loop = asyncio.get_running_loop()
        if not (place and limit and supervisor.state == PluginState.READY) or \
                loop.time() < self._next_walk.get(supervisor.name, 0.0):
            return
        began = loop.time()
        problem = await asyncio.to_thread(workspace_problem, place, limit, plugin_pids(self._factory, supervisor))
        self._next_walk[supervisor.name] = loop.time() + WORKSPACE_WALK_SPACING * (loop.time() - began)
        if problem:
            supervisor.recycle(f"its place in the workspace is full: {problem}", counts=True)


def plugin_pids(factory: WorkerFactory, supervisor: PluginSupervisor) -> list[int]:
    """The plugin's processes: its cgroup's members where it has one, else its worker's tree."""
    if factory.cgroups.available:
        return factory.cgroups.members(supervisor.name)
    worker = supervisor.worker
    if worker is None or not worker.pid:
        return []
    try:
        root = psutil.Process(worker.pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []
