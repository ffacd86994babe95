"""Everything a plugin's worker is made from, in one place: its uid, data directory, disk, cgroup,
place in the workspace, sandbox plan, resolved secrets and launch.

A supervisor asks its factory for a worker at its first start and at every restart; the factory
owns the machine-wide pieces (cgroups, uids, disk images, the launcher) that every worker shares, so
the supervisor owns one worker's life and nothing else, and the host only wires the two together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from functools import partial
from typing import TYPE_CHECKING

from qanot_worker import protocol as p

from .cgroups import CgroupLimits, Cgroups
from .config import own_workspace
from .datadirs import DataDirs, place_full_error, workspace_problem
from .disks import DiskImages
from .egress_policy import NameResolver
from .errors import PlaceFull, PluginStartError, StartRefused
from .forkserver import ForkServerLauncher
from .heartbeat import Heartbeats
from .launcher import Launcher, SubprocessLauncher
from .log_ring import LogRing
from .mcp_servers import bridge_config, mcp_server, server_warnings
from .plugin_secrets import resolve_config_secrets
from .runtime import worker_import_root
from .sandbox_spec import PluginPlaces, python_paths, sandbox_spec, unreachable
from .settings import Config
from .tool_cache import ToolCache
from .uids import UID_RANGE, UidMap, used_elsewhere, writable_by
from .worker import WorkerHandle, WorkerOptions

if TYPE_CHECKING:
    from .supervisor import PluginSupervisor

__all__ = ["WorkerFactory"]

log = logging.getLogger("qanot_host")

# Workers starting at once (launch to loaded): enough to keep every core busy while others wait on a
# pipe, few enough that hundreds starting together each start in a fraction of handshake_timeout.
START_CONCURRENCY = 4 * (os.cpu_count() or 1)


# An MCP server's worker imports the MCP SDK's client before anything else: 1.6 s of CPU here, ten
# times a plain plugin's import, which on a loaded two-core machine ran past a 10 s handshake_timeout.
MCP_BRIDGE_LOAD_FACTOR = 3


class WorkerFactory:
    def __init__(self, config: Config, launcher: Launcher | None = None) -> None:
        self.config = config  # the host's current one: a reload hands the factory the new config
        self.launcher = launcher
        self.cgroups = Cgroups()
        self.import_root = ""
        self.workspaces: dict[str, str] = {}  # plugin -> the real path of its place in the workspace
        self.rings: dict[str, LogRing] = {}  # plugin -> its recent output, across its workers
        self._said_unbounded: set[str] = set()  # plugins told once that memory_mb 0 leaves them no ceiling
        state_dir = config.host.state_dir
        self._disks = DiskImages(state_dir)
        self._data = DataDirs(state_dir)
        self._uids = UidMap(state_dir, config.host.sandbox.uid_base)
        self.tool_cache = ToolCache(state_dir)  # what lazy plugins offer, without starting them
        self.start_gate = asyncio.Semaphore(START_CONCURRENCY)  # workers between launch and loaded
        self.heartbeats = Heartbeats()  # one timer for every worker's pings
        self.names = NameResolver()  # the DNS look-ups of every narrowed plugin's egress, and their answers
        self._grants_checked: set[str] = set()  # plugins whose write grants were looked at
        # As root, each worker gets namespaces (PID, mount, IPC, UTS) and a root of its own.
        sandbox = config.host.sandbox
        self.namespaces = (sandbox.enabled and sandbox.namespaces and os.geteuid() == 0
                           and sys.platform.startswith("linux"))

    def open(self) -> None:
        """At the host's start: the workers' import root, and the launcher if none was given."""
        self.import_root = worker_import_root(self.config.host.state_dir)
        if self.launcher is None:
            if self.config.host.launcher == "forkserver" and sys.platform.startswith("linux"):
                self.launcher = ForkServerLauncher(self.import_root)
            else:
                self.launcher = SubprocessLauncher()

    def prepare(self) -> None:
        """Workers will be wanted soon: the launcher gets ready in the background meanwhile."""
        if self.launcher is not None:
            self.launcher.prepare()

    async def close(self) -> None:
        """After every supervisor stopped: whatever their workers left, and the launcher."""
        if self.launcher is not None:
            await self.launcher.close()
        await self.cgroups.remove()

    async def release_disk(self, plugin: str) -> None:
        """`plugin`'s workers are stopped by a reload (removed, or to start anew): its launcher lets
        its disk go, so that a removed plugin's loop device does not stay attached until the host
        stops, and a disk_mb raised by the reload can grow the image."""
        if self.launcher is not None and self._disks.available:
            await self.launcher.release_disk(self._disks.path(plugin))

    async def spawn(self, supervisor: PluginSupervisor) -> WorkerHandle:
        """A started worker for `supervisor` (first start and every restart); PluginStartError if not."""
        try:
            return await self._spawn(supervisor)
        except OSError as exc:  # the host short of something (a pipe, a directory): this plugin's start failed
            raise PluginStartError(supervisor.name, f"its worker could not be started: "
                                   f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}") from None

    async def _spawn(self, supervisor: PluginSupervisor) -> WorkerHandle:
        config = supervisor.config  # the host's, or a build job's (the host's plus itself)
        settings = config.host
        source = supervisor.source
        assert source is not None and self.launcher is not None
        name = supervisor.name
        if not await self.cgroups.kill(name):  # whatever the last worker left must be gone first
            raise PluginStartError(name, "processes of its last worker survived SIGKILL; not starting another")
        sandboxed = settings.sandbox.enabled
        uid = self._plugin_uid(name)
        data_dir = self._data.prepare(name, uid, tmp=not self.namespaces)
        limits = config.limits_for(name)
        bridged = mcp_server(config, name) is not None  # an MCP server's worker
        disk, disk_problem = "", ""
        if self.namespaces and limits.disk_mb:
            disk, disk_problem = await self._disks.image(name, limits.disk_mb)
            if disk_problem and self._disks.available:  # this machine makes disks; this one failed
                raise PluginStartError(name, f"its disk ({limits.disk_mb} MB, limits.disk_mb) could not be made: "
                                       f"{disk_problem}; it does not start without it (its files would be on the "
                                       "host's disk, with no ceiling): disk_mb 0 gives it a plain directory")
        options = WorkerOptions(
            import_root=self.import_root, data_dir=data_dir, max_frame=settings.max_frame_bytes,
            handshake_timeout=settings.handshake_timeout * (MCP_BRIDGE_LOAD_FACTOR if bridged else 1),
            setup_timeout=settings.setup_timeout,
            teardown_timeout=settings.teardown_timeout, term_timeout=settings.term_timeout,
            ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout,
            cancel_grace=settings.cancel_grace, extra_env=config.settings_for(name).permissions.environment(),
            namespaces=self.namespaces, disk=disk, log_lines_per_second=limits.log_lines_per_second,
            oom_kills=partial(self.cgroups.oom_kills, name) if sandboxed else None, memory_mb=limits.memory_mb,
            members=partial(self.cgroups.members, name) if sandboxed and self.cgroups.available else None,
            start_gate=self.start_gate, heartbeats=self.heartbeats, names=self.names, bridged=bridged)
        if disk_problem:
            options.extra_env[p.DISK_KEY] = f"error:{disk_problem}"
        elif self.namespaces and not limits.disk_mb:
            options.extra_env[p.DISK_KEY] = "off"  # the operator's choice: a plain directory
        if name not in self._grants_checked:  # once a host, not at every restart
            self._grants_checked.add(name)
            self._warn_unwritable_grants(config, name, uid)
        programs = None
        try:
            if bridged:  # the bridge's config is the server's entry
                plugin_config, redact, programs = bridge_config(config, name)
                if programs is not None and not supervisor.sandbox_warned:
                    for ungranted in server_warnings(config, name, programs):
                        log.warning("plugin %s: %s", name, ungranted)
            else:
                index = next(i for i, entry in enumerate(config.plugins) if entry.name == name)
                plugin_config, redact = resolve_config_secrets(supervisor.entry.config,
                                                               f"{config.path}: plugins[{index}].config")
        except ValueError as exc:
            raise StartRefused(name, str(exc)) from None
        options.redact = redact or None
        options.ring = self.rings.setdefault(name, LogRing())
        plugin_config.setdefault("workspace_dir", config.workspace_dir)
        worker = WorkerHandle(name, self.launcher, options, supervisor.worker_exited, supervisor.call_ended)
        if sandboxed and self.cgroups.available and not limits.memory_mb and name not in self._said_unbounded:
            self._said_unbounded.add(name)  # once, not at every restart
            log.warning("plugin %s: limits.memory_mb is 0: its memory has no ceiling", name)
        cgroups = self.cgroups.prepare(name, CgroupLimits(
            settings.sandbox.pids_max, (limits.memory_mb or 0) * 2**20 or None, limits.cpu_weight or 100,
            limits.cpu_max)) if sandboxed else {}
        places = PluginPlaces(name, source.directory, supervisor.site_dirs, data_dir, self.import_root,
                              self._data.root_dir, self._own_workspace(config, name, uid), programs)
        sandbox = sandbox_spec(config, places, uid, cgroups, self.namespaces)
        if uid >= 0:
            interpreter = [] if self.namespaces else python_paths()  # with its own root, bound for it
            run = [*programs.readable, *programs.executable] if programs is not None else []
            problem = unreachable([self.import_root, source.directory, *supervisor.site_dirs, *interpreter, *run], uid,
                                  whole_path=not self.namespaces)
            if problem:
                raise PluginStartError(name, problem)
        try:
            await worker.start(source.entry_file, source.directory, supervisor.site_dirs, plugin_config, sandbox)
        except BaseException:
            await worker.stop(teardown=False)
            raise
        return worker

    def group_cpu(self, plugin: str) -> float | None:
        """The plugin cgroup's CPU seconds (None where the host has no cgroups): one pread."""
        return self.cgroups.cpu_seconds(plugin) if self.cgroups.available else None

    def group_usage(self, plugin: str) -> tuple[float | None, float | None]:
        """The plugin cgroup's (memory MB, CPU s); (None, None) where the host has no cgroups."""
        return self.cgroups.usage(plugin) if self.cgroups.available else (None, None)

    def place_of(self, plugin: str) -> str | None:
        """The real path of the plugin's place in the workspace: as its last start made it; for a
        plugin this host has not started (a lazy one), where it is, if it is there (a directory, not
        a link), for the limits watch to measure what an earlier host's worker left."""
        real = self.workspaces.get(plugin)
        if real is not None or not self.config.has_place(plugin):
            return real
        path = os.path.join(os.path.realpath(self.config.workspace_dir), plugin)
        return path if not os.path.islink(path) and os.path.isdir(path) else None

    async def place_problem(self, plugin: str, limit_mb: int | None) -> str | None:
        """Why the plugin's place in the workspace (place_of) is over `limit_mb`, measured off the
        loop; None if it is within, or there is none, or no ceiling."""
        place = self.place_of(plugin)
        if not place or not limit_mb:
            return None
        return await asyncio.to_thread(workspace_problem, place, limit_mb)

    def _own_workspace(self, config: Config, plugin: str, uid: int) -> tuple[str, str] | None:
        """workspace_dir/NAME for the plugin to write: (as its config names it, its real path)."""
        if not config.has_place(plugin):
            # no longer its (a reload gave it workspace: false): the limits watch measured the old one
            self.workspaces.pop(plugin, None)  # for it still, and recycled it on (attack pass 64)
            return None
        try:
            real = self._data.prepare_workspace(config.workspace_dir, plugin, uid)
        except OSError as exc:
            raise PluginStartError(plugin, f"its place in the workspace, {own_workspace(config, plugin)}: "
                                   f"{exc.strerror or exc} (set host.plugins.{plugin}.workspace to false to start "
                                   "it without one)") from None
        problem = workspace_problem(real, config.limits_for(plugin).workspace_mb or 0)
        if problem:
            raise PlaceFull(plugin, place_full_error(plugin, problem))
        self.workspaces[plugin] = real
        return own_workspace(config, plugin), real

    @staticmethod
    def _warn_unwritable_grants(config: Config, plugin: str, uid: int) -> None:
        """A write grant the plugin's uid may not write (as `check` reports it) works as a read grant:
        said when the plugin starts, too."""
        grant = config.settings_for(plugin).permissions.filesystem
        for index, path in enumerate(grant.write if grant is not None and uid >= 0 else []):
            try:
                writable = writable_by(path, uid)
            except OSError:
                continue  # not there: the worker reports the grant missing
            if not writable:
                log.warning("plugin %s: host.plugins.%s.permissions.filesystem.write[%d]: %s is not writable by "
                            "the plugin's uid %d (chown or chmod it): it can only read there", plugin, plugin, index,
                            path, uid)

    def reserve_uids(self, plugins: list[str]) -> None:
        """Plugins about to start: their uids in one go. A failure here is each plugin's own to
        report when it starts."""
        if self._identity:
            try:
                self._uids.reserve(plugins)
            except OSError:
                pass

    async def warn_of_shared_uids(self, plugins: list[str]) -> None:
        """Say which of these plugins' uids a process not of this host runs as: another host with a
        state_dir of its own gives same-named plugins the same uids unless its uid_base differs."""
        if not self._identity:
            return
        uids = {}
        for plugin in plugins:
            try:
                uids[self._uids.uid(plugin)] = plugin
            except OSError:
                continue  # said when it starts
        for plugin, (uid, pid, name) in (await asyncio.to_thread(used_elsewhere, uids, os.getpid())).items():
            log.warning("plugin %s: its uid %d is also that of process %d (%s), which is not this host's: another "
                        "host with a state_dir of its own gives plugins the same uids; give each host a "
                        "host.sandbox.uid_base of its own, %d or more apart", plugin, uid, pid, name, UID_RANGE)

    @property
    def _identity(self) -> bool:
        sandbox = self.config.host.sandbox
        return sandbox.enabled and sandbox.identity and os.geteuid() == 0

    def _plugin_uid(self, plugin: str) -> int:
        if not self._identity:
            return -1
        try:
            return self._uids.uid(plugin)
        except OSError as exc:
            raise PluginStartError(plugin, f"no uid of its own: {exc.strerror or exc}") from None

