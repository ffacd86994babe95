"""The host: config.json in, one worker per enabled plugin, their tools in one ToolRegistry.

Plugins start concurrently, each as soon as the plugins named in its plugin_deps are ready. Tools are
registered afterwards in config.json order, so when two plugins offer the same tool name the outcome
does not depend on which worker happened to start first: the plugin listed earlier keeps the name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .config import Config, PluginEntry, load_config
from .discovery import PluginSource, find_plugin, manifest_problems, searched_paths
from .environments import EnvironmentBuilder
from .errors import PluginError, PluginStartError, PluginUnavailable, describe_exit
from .launcher import Launcher, SubprocessLauncher
from .registry import RegisteredTool, ToolRegistry
from .runtime import worker_import_root
from .worker import WorkerHandle, WorkerOptions
from .workspace import Workspace

__all__ = ["Host", "PluginRuntime", "PluginState"]

log = logging.getLogger("qanot_host")


class PluginState:
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # did not start, or cannot be kept running; error says why
    CRASHED = "crashed"
    STOPPED = "stopped"


@dataclass
class PluginRuntime:
    """Everything the host knows about one configured plugin."""

    entry: PluginEntry
    state: str = PluginState.STARTING
    error: str = ""
    source: PluginSource | None = None
    worker: WorkerHandle | None = None
    tools: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once starting is over

    @property
    def name(self) -> str:
        return self.entry.name

    def fail(self, message: str) -> None:
        self.state = PluginState.FAILED
        self.error = message
        self.ready.set()


class Host:
    """Async context manager: ``async with Host("config.json") as host: await host.registry.execute(...)``."""

    def __init__(self, config: Config | str, *, launcher: Launcher | None = None,
                 registry: ToolRegistry | None = None) -> None:
        self.config = load_config(config) if isinstance(config, str) else config
        self.registry = registry if registry is not None else ToolRegistry(self.config.host.call_timeout)
        self.plugins: dict[str, PluginRuntime] = {
            e.name: PluginRuntime(e) for e in self.config.plugins if e.enabled}
        self.workspace = Workspace(self.config.workspace_dir)
        self._launcher = launcher or SubprocessLauncher()
        settings = self.config.host
        self._envs = EnvironmentBuilder(settings.state_dir, settings.wheel_dir, settings.offline,
                                        settings.install_timeout)
        self._import_root = ""
        self._stopping = False

    async def __aenter__(self) -> "Host":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every enabled plugin; one that fails is reported and the rest run on."""
        os.makedirs(self.config.host.state_dir, exist_ok=True)
        self._import_root = worker_import_root(self.config.host.state_dir)
        order = list(self.plugins)
        for name in order:
            # Every source is located before any starts, so plugin_deps can be followed at once.
            self.plugins[name].source = find_plugin(name, self.config)
        await asyncio.gather(*(self._start_plugin(self.plugins[name]) for name in order))
        for name in order:
            self._register_tools(self.plugins[name])
        for name in order:
            runtime = self.plugins[name]
            if runtime.state == PluginState.READY and runtime.worker and runtime.worker.info:
                info = runtime.worker.info
                await self.workspace.add_plugin_docs(name, info.tools_md, info.soul_append)
        ready = [r for r in self.plugins.values() if r.state == PluginState.READY]
        log.info("ready: %d of %d plugins, %d tools", len(ready), len(self.plugins),
                 len(self.registry.tool_names))

    async def _start_plugin(self, runtime: PluginRuntime) -> None:
        try:
            source = self._locate(runtime)
            await self._await_deps(runtime, source)
            site_dirs = await self._envs.site_dirs(runtime.name, source.manifest.dependencies)
            runtime.worker = await self._spawn_worker(runtime, source, site_dirs)
        except PluginError as exc:
            runtime.fail(exc.detail)
            log.error("plugin %s failed to start: %s", runtime.name, exc.detail)
            return
        runtime.state = PluginState.READY
        runtime.ready.set()
        log.info("plugin %s ready (pid %s, %d tools)", runtime.name, runtime.worker.pid,
                 len(runtime.worker.tools))

    def _locate(self, runtime: PluginRuntime) -> PluginSource:
        source = runtime.source
        if source is None:
            raise PluginStartError(runtime.name, "not found: no " + searched_paths(runtime.name, self.config))
        for warning in source.warnings:
            log.warning("plugin %s: %s", runtime.name, warning)
        problems = manifest_problems(source, runtime.entry)
        if problems:
            raise PluginStartError(runtime.name, "; ".join(problems))
        return source

    async def _await_deps(self, runtime: PluginRuntime, source: PluginSource) -> None:
        for dep in source.manifest.plugin_deps:
            other = self.plugins.get(dep)
            if other is None:
                raise PluginStartError(runtime.name, f"plugin_deps: {dep!r} is not an enabled plugin "
                                       "in config.json")
            if self._depends_on(dep, runtime.name):
                raise PluginStartError(runtime.name, f"plugin_deps: {dep!r} depends back on "
                                       f"{runtime.name!r} (a cycle)")
            await other.ready.wait()
            if other.state != PluginState.READY:
                raise PluginStartError(runtime.name, f"plugin_deps: {dep!r} failed to start")

    async def _spawn_worker(self, runtime: PluginRuntime, source: PluginSource,
                            site_dirs: list[str]) -> WorkerHandle:
        settings = self.config.host
        data_dir = os.path.join(settings.state_dir, "data", runtime.name)
        os.makedirs(data_dir, exist_ok=True)
        options = WorkerOptions(
            import_root=self._import_root, data_dir=data_dir, max_frame=settings.max_frame_bytes,
            handshake_timeout=settings.handshake_timeout, setup_timeout=settings.setup_timeout,
            teardown_timeout=settings.teardown_timeout)
        worker = WorkerHandle(runtime.name, self._launcher, options, self._worker_exited)
        config: dict[str, Any] = dict(runtime.entry.config)
        config.setdefault("workspace_dir", self.config.workspace_dir)
        try:
            await worker.start(source.entry_file, source.directory, site_dirs, config)
        except BaseException:
            await worker.stop(teardown=False)
            raise
        return worker

    def _register_tools(self, runtime: PluginRuntime) -> None:
        if runtime.state != PluginState.READY or runtime.worker is None:
            return
        runtime.tools, runtime.conflicts = [], []
        for spec in runtime.worker.tools:
            tool = RegisteredTool(spec.name, spec.description, spec.parameters,
                                  partial(self._call_plugin, runtime, spec.name), runtime.name)
            holder = self.registry.add_plugin_tool(tool)
            if holder is None:
                runtime.tools.append(spec.name)
                continue
            owner = f"plugin {holder.plugin}" if holder.plugin else "the host"
            runtime.conflicts.append(spec.name)
            log.error("plugin %s: tool %s is not registered: %s already provides it (the plugin "
                      "listed first in config.json keeps a tool name)", runtime.name, spec.name, owner)

    def _depends_on(self, plugin: str, target: str) -> bool:
        """True if `plugin` depends on `target`, directly or through other plugins' plugin_deps."""
        seen: set[str] = set()
        stack = [plugin]
        while stack:
            name = stack.pop()
            if name == target:
                return True
            runtime = self.plugins.get(name)
            if name in seen or runtime is None or runtime.source is None:
                continue
            seen.add(name)
            stack.extend(runtime.source.manifest.plugin_deps)
        return False

    # ---- calls -----------------------------------------------------------------------------------

    async def _call_plugin(self, runtime: PluginRuntime, tool: str, params: dict[str, Any]) -> str:
        worker = runtime.worker
        if runtime.state != PluginState.READY or worker is None:
            raise PluginUnavailable(runtime.name, runtime.error or f"plugin is {runtime.state}")
        runtime.calls += 1
        try:
            return await worker.call(tool, params, self.config.call_timeout(runtime.name, tool))
        except PluginError:
            runtime.errors += 1
            raise

    def _worker_exited(self, worker: WorkerHandle) -> None:
        runtime = self.plugins.get(worker.plugin)
        if runtime is None or runtime.worker is not worker or self._stopping:
            return
        if runtime.state == PluginState.READY:
            code = worker.exited.result()
            runtime.state = PluginState.CRASHED
            runtime.error = f"worker crashed ({describe_exit(code)})"
            log.error("plugin %s: worker pid %s exited unexpectedly (%s)", runtime.name, worker.pid,
                      describe_exit(code))

    # ---- stop ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """teardown() in every worker, then SIGTERM, then SIGKILL. Always ends; safe to repeat."""
        self._stopping = True
        workers = [r.worker for r in self.plugins.values() if r.worker is not None]
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for runtime in self.plugins.values():
            if runtime.state in (PluginState.READY, PluginState.CRASHED, PluginState.STARTING):
                runtime.state = PluginState.STOPPED
            self.registry.remove_plugin_tools(runtime.name)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for runtime in self.plugins.values():
            worker = runtime.worker
            rows.append({
                "plugin": runtime.name, "state": runtime.state, "error": runtime.error,
                "pid": worker.pid if worker else None,
                "uptime": round(now - worker.started_at, 3) if worker and worker.started_at else 0.0,
                "tools": list(runtime.tools), "conflicts": list(runtime.conflicts),
                "calls": runtime.calls, "errors": runtime.errors})
        return rows


