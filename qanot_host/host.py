"""The host: config.json in, one supervised worker per enabled plugin, their tools in one registry.

Plugins start concurrently, each as soon as the plugins named in its plugin_deps are ready. Tools are
registered afterwards in config.json order, so when two plugins offer the same tool name the outcome
does not depend on which worker happened to start first: the plugin listed earlier keeps the name.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable


from .cgroups import sweep_stale_cgroups
from .config import directory_problems, load_config
from .discovery import PluginSource, find_plugin, manifest_problems, manifest_warnings, searched_paths
from .environments import EnvironmentBuilder, sweep_partial_builds
from .errors import (ConfigError, DependencyError, PluginError, PluginStartError, PluginUnavailable,
                     ProtocolMismatch, StartRefused, WorkerTimeout)
from .fd_limit import raise_open_files_limit
from .fingerprint import plugin_fingerprint
from .channel import FRAMES
from .launcher import Launcher
from .limits_watch import LimitsWatch
from .log_ring import LogRing
from .look_alike import LookAlikes
from .mcp_servers import install_stamp, mcp_server, mcp_tool_name
from .output import printable
from .registry import RegisteredTool, ToolRegistry, tool_name_problem
from .sandbox_spec import withheld_permissions
from .schema import SchemaError
from .settings import Config
from .source_builds import SourceBuilds
from .supervisor import SERVING_STATES, PluginState, PluginSupervisor
from .tool_cache import offer_key
from .tool_index import INDEX_TIMEOUT, ToolIndex
from .worker_factory import WorkerFactory
from .workspace import Workspace

if TYPE_CHECKING:
    from .metrics import HostMetrics

__all__ = ["Host", "PluginState", "PluginSupervisor"]

log = logging.getLogger("qanot_host")

# Plugins that start together register their tools in config.json's order, so that a contested name
# goes to the one listed first without changing hands; none waits longer than this for the slower
# ones listed before it.
REGISTRATION_PATIENCE = 2.0


class Host:
    """Async context manager: ``async with Host("config.json") as host: await host.registry.execute(...)``."""

    def __init__(self, config: Config | str, *, launcher: Launcher | None = None,
                 registry: ToolRegistry | None = None) -> None:
        self.config = load_config(config) if isinstance(config, str) else config
        self.registry = registry if registry is not None else ToolRegistry()
        self.registry.timeout = self.config.host.call_timeout
        self.plugins: dict[str, PluginSupervisor] = {}
        self._index = ToolIndex()
        self.workspace = Workspace(self.config.workspace_dir)
        self._factory = WorkerFactory(self.config, launcher)
        self._install_seconds: dict[str, float] = {}  # plugin -> its environments' build time, across reloads
        self._envs = self._environment_builder(self.config)
        self._stopping = False
        self._monitor: asyncio.Task | None = None
        self._registration_paused = False
        self._held_registrations: set[str] = set()  # plugins that got tools during a pause, before their turn
        self._released: set[str] = set()  # plugins of the start in progress whose turn to register has come
        self.metrics: HostMetrics | None = None  # host.metrics: Prometheus, /healthz, /readyz
        self._fingerprints: dict[str, str] = {}  # plugin -> its directory's, when its worker started
        self._last_offer: dict[str, set[str]] = {}  # plugin -> the tool names it offered last (since the host started)
        self._claims: dict[str, set[str]] = {}  # plugin -> the names of its latest offer it could have
        self._offered_by: dict[str, set[str]] = {}  # tool name -> the plugins claiming it
        self._look_alikes = LookAlikes()
        self._ranks: tuple[Config | None, dict[str, int]] = (None, {})  # config.json's order, for that config
        self._fingerprinting = _Fingerprinting()
        self._operating = asyncio.Lock()  # reload and restart_plugin: one at a time
        self.registry.explain_missing = lambda tool, whole=False: self._index.explain_missing(
            tool, self.config, self.plugins, whole)

    async def __aenter__(self) -> "Host":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _environment_builder(self, config: Config) -> EnvironmentBuilder:
        settings = config.host
        envs = EnvironmentBuilder(settings.state_dir, settings.wheel_dir, settings.offline,
                                  settings.install_timeout, settings.index_url, self._install_seconds)
        envs.source_builds = SourceBuilds(self._factory, config, envs)
        return envs

    # ---- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every enabled plugin; one that fails is reported and the rest run on."""
        problems = directory_problems(self.config, create=True)
        if problems:
            raise ConfigError(problems[0])
        if self.config.host.metrics:  # first: /healthz answers, and /readyz says not yet, while plugins start
            from .metrics import HostMetrics  # prometheus_client, only for a host that serves metrics
            self.metrics = HostMetrics(self)
            self.metrics.serve(self.config.host.metrics)
            self.registry.observer = self.metrics.observe_call
        try:
            async with self._operating:  # a reload asked for meanwhile waits: one start of each plugin
                await self._start()
        except BaseException:
            await asyncio.shield(self.stop())  # a host that fails on its way up leaves nothing behind
            raise

    async def _start(self) -> None:
        for stale in sweep_stale_cgroups() + sweep_partial_builds(self.config.host.state_dir):
            log.info("removed %s, left behind by a qanot-host that is gone", stale)
        raise_open_files_limit()
        self._factory.open()
        self._index.build_if_useful(self.config, self.plugins)  # a disabled plugin: read beside the start
        await self._start_plugins([e.name for e in self.config.plugins if e.enabled])
        self._index.build_if_useful(self.config, self.plugins)  # some failed to start
        watch = LimitsWatch(self._factory)
        self._monitor = asyncio.get_running_loop().create_task(
            watch.run(lambda: list(self.plugins.values()), lambda: self.config.host.limits_interval))
        ready = [s for s in self.plugins.values() if s.serving]
        log.info("ready: %d of %d plugins, %d tools", len(ready), len(self.plugins),
                 len(self.registry.tool_names))

    async def tool_index_ready(self, timeout: float = INDEX_TIMEOUT) -> None:
        """Wait (up to `timeout`) for the index of declared tools, where it is of use (it only
        improves an unknown tool's error, so nothing else waits for it)."""
        self._index.build_if_useful(self.config, self.plugins)
        await self._index.ready(timeout)

    async def _start_plugins(self, names: list[str]) -> None:
        entries = {e.name: e for e in self.config.plugins}
        fresh = []
        for name in names:
            # Every source is located before any starts, so plugin_deps can be followed at once.
            supervisor = PluginSupervisor(entries[name], self.config, find_plugin(name, self.config),
                                          self._factory, self._register_tools)
            self.plugins[name] = supervisor
            fresh.append(supervisor)
        if any(not s.lazy for s in fresh):  # a worker will start: its launcher gets ready meanwhile
            self._factory.prepare()
        self._factory.reserve_uids(names)
        # before any of them has a process: any process that runs as one of their uids is another's
        await self._factory.warn_of_shared_uids(names)
        # in config.json's order, as status lists them (a plugin started anew takes its own place)
        self.plugins = {e.name: self.plugins[e.name] for e in self.config.plugins if e.name in self.plugins}
        # config.json's order decides tool-name conflicts among them: each registers once every one
        # listed before it has started (or failed), so a restarted plugin listed first is not held
        # for as long as a slow new one after it takes (attack pass 23: "Unknown tool" for 25 s)
        # ... for REGISTRATION_PATIENCE at most: then each registers as it is up, and a slower plugin listed
        # before it takes a contested name once it is up itself (attack pass 69: a lazy plugin whose setup()
        # hung left every tool of those after it, eager ones too, "Unknown" for the whole setup_timeout)
        starting = {s.name for s in fresh}
        waiting = collections.deque(s for s in self.plugins.values() if s.name in starting)
        finished: set[str] = set()
        impatient = False

        def release_out_of_turn() -> None:
            nonlocal impatient
            impatient = True
            slow = [s.name for s in waiting if s.name not in finished]
            early = [s for s in waiting if s.name in finished]
            if early:
                log.warning("%s still starting after %g s: the tools of %s are registered meanwhile (a name "
                            "they share with a plugin listed before them goes to that one once it is up)",
                            _names(slow), REGISTRATION_PATIENCE, _names([s.name for s in early]))
            for supervisor in early:
                self._release_registration(supervisor)

        async def start(supervisor: PluginSupervisor) -> None:
            try:
                await self._start_plugin(supervisor)
            finally:
                finished.add(supervisor.name)
                while waiting and waiting[0].name in finished:
                    self._release_registration(waiting.popleft())
                if impatient:
                    self._release_registration(supervisor)

        self._registration_paused = True
        patience = asyncio.get_running_loop().call_later(REGISTRATION_PATIENCE, release_out_of_turn)
        try:
            await asyncio.gather(*(start(s) for s in fresh))
        finally:
            patience.cancel()
            self._registration_paused = False
            self._released = set()
        for supervisor in waiting:  # what a cancelled start left
            self._register_tools(supervisor)
        self._register_held()
        if self.config.host.workspace_docs:
            await self.workspace.add_plugins_docs([
                (s.name, s.offer.info.tools_md, s.offer.info.soul_append) for s in fresh
                if s.serving and s.offer is not None])

    async def _start_plugin(self, supervisor: PluginSupervisor) -> None:
        try:
            source = self._locate(supervisor)
            await self._await_deps(supervisor, source)
            fingerprint = self._fingerprints[supervisor.name] = await self._fingerprinting.of(source, self.config)
            site_dirs = await self._envs.site_dirs(supervisor.name, source.manifest.dependencies)
            supervisor.offer_key = offer_key(fingerprint, supervisor.entry,
                                             self.config.settings_for(supervisor.name), site_dirs)
            await supervisor.start(site_dirs)
        except PluginError as exc:
            # an MCP server's worker may fail for a while (a remote server not up yet): its restart policy
            if _may_retry(exc) and mcp_server(self.config, supervisor.name) and supervisor.retry_start(exc.detail):
                return
            supervisor.fail(exc.detail)
            log.error("plugin %s failed to start: %s", supervisor.name, exc.detail)
            return
        except Exception as exc:  # noqa: BLE001 - whatever one plugin's start hits, the others start
            detail = f"{type(exc).__name__}: {exc}"
            supervisor.fail(detail)
            log.error("plugin %s failed to start: %s", supervisor.name, detail)
            log.debug("plugin %s: the start failed here", supervisor.name, exc_info=True)
            return
        worker = supervisor.worker
        if worker is None:  # lazy: its tools from the cache, or listed by a worker already stopped
            log.info("plugin %s ready, idle (%d tools; its first call starts its worker)", supervisor.name,
                     len(supervisor.offered_tools), extra={"plugin": supervisor.name})
            return
        log.info("plugin %s ready (pid %s, %d tools)", supervisor.name, worker.pid, len(supervisor.offered_tools),
                 extra={"plugin": supervisor.name})

    def _locate(self, supervisor: PluginSupervisor) -> PluginSource:
        source = supervisor.source
        if source is None:
            raise PluginStartError(supervisor.name, "not found: no " + searched_paths(supervisor.name, self.config))
        if source.problem:  # a plugin.json that exists but cannot be used: its dependencies would be lost
            raise PluginStartError(supervisor.name, source.problem)
        problems = manifest_problems(source, supervisor.entry, self.config)
        if problems:
            raise PluginStartError(supervisor.name, "; ".join(problems))
        for warning in manifest_warnings(source, supervisor.entry, self.config):
            log.warning("plugin %s: %s", supervisor.name, warning)
        withheld = withheld_permissions(source.manifest.permissions,
                                        self.config.settings_for(supervisor.name).permissions)
        if withheld:
            log.warning("plugin %s: plugin.json asks for %s, not granted in config.json "
                        "(host.plugins.%s.permissions): starting without", supervisor.name,
                        ", ".join(withheld), supervisor.name)
        return source

    async def _await_deps(self, supervisor: PluginSupervisor, source: PluginSource) -> None:
        for dep in source.manifest.plugin_deps:
            other = self.plugins.get(dep)
            if other is None:
                raise PluginStartError(supervisor.name, f"plugin_deps: {dep!r} is not an enabled plugin "
                                       "in config.json")
            if self._depends_on(dep, supervisor.name):
                raise PluginStartError(supervisor.name, f"plugin_deps: {dep!r} depends back on "
                                       f"{supervisor.name!r} (a cycle)")
            await other.settled.wait()
            if not other.serving:
                raise PluginStartError(supervisor.name, f"plugin_deps: {dep!r} failed to start")

    def _depends_on(self, plugin: str, target: str) -> bool:
        """True if `plugin` depends on `target`, directly or through other plugins' plugin_deps."""
        seen: set[str] = set()
        stack = [plugin]
        while stack:
            name = stack.pop()
            if name == target:
                return True
            supervisor = self.plugins.get(name)
            if name in seen or supervisor is None or supervisor.source is None:
                continue
            seen.add(name)
            stack.extend(supervisor.source.manifest.plugin_deps)
        return False

    def _register_held(self) -> None:
        """Plugins whose workers came up while registration was held (a lazy one called during a
        reload, a crashed one restarted): now, after the plugins that were starting."""
        held, self._held_registrations = self._held_registrations, set()
        for name in held:
            if name in self.plugins:
                self._register_tools(self.plugins[name])

    def _release_registration(self, supervisor: PluginSupervisor) -> None:
        """Its turn to register has come (once: in config.json's order, or out of it when slower ones
        listed before it kept it waiting)."""
        if supervisor.name in self._released:
            return
        self._released.add(supervisor.name)
        self._held_registrations.discard(supervisor.name)
        self._register_tools(supervisor)

    def _register_tools(self, supervisor: PluginSupervisor) -> None:
        """(Re-)register a ready plugin's tools. A name belongs to the plugin listed first in
        config.json among those whose latest offer has it, whether it is serving now or not (a
        failed or restarting plugin's names wait for it: attack pass 24 took a failed plugin's name
        with one listed after it, and kept it once the first was fixed); an MCP server's tool whose
        name is a plugin's goes to mcp_{server}_{tool}, as Qanot names it."""
        if self._registration_paused and supervisor.name not in self._released:
            self._held_registrations.add(supervisor.name)  # done in its turn, or once the start in progress ends
            return
        if not supervisor.serving:
            return
        offered = {spec.name for spec in supervisor.offered_tools}
        server = mcp_server(self.config, supervisor.name) is not None
        kept = offered | {mcp_tool_name(supervisor.name, name) for name in offered} if server else offered
        freed = []
        for name in set(supervisor.tools) - kept:  # a restarted worker may offer fewer tools
            tool = self.registry.get(name)
            if tool is not None and tool.plugin == supervisor.name:
                self.registry.remove_tool(name)
                freed.append(name)
        unknown = sorted(set(self.config.settings_for(supervisor.name).tool_timeouts) - offered)
        if unknown:
            log.warning("plugin %s: host.plugins.%s.tool_timeouts names %s, which the plugin does not offer "
                        "(it offers %s)", supervisor.name, supervisor.name, ", ".join(unknown),
                        printable(", ".join(sorted(offered)) or "none", 2000))  # the worker's names
        tools: list[str] = []
        conflicts: list[str] = []
        refused: list[str] = []
        displaced: set[str] = set()  # plugins to register anew: those it took a name from, and owners without theirs
        # mcp_{server}_... names are where each server's tools go when their own names are taken: a name
        # there is the server's whose name matches longest (s_calc's, not s's, for mcp_s_calc_eval)
        prefixes = sorted((mcp_tool_name(other.name, ""), other.name) for other in self.config.mcp_servers)

        def kept_for_another(name: str) -> bool:
            owners = [owner for prefix, owner in prefixes if name.startswith(prefix)]
            return bool(owners) and max(owners, key=len) != supervisor.name
        # its claims: the names it offers that it could have (not one refused below)
        given_up = self._note_offer(supervisor.name, offered, {spec.name for spec in supervisor.offered_tools
                                                               if not spec.problem and not kept_for_another(spec.name)})
        for spec in supervisor.offered_tools:
            try:
                if spec.problem:
                    raise SchemaError(spec.problem)
                if kept_for_another(spec.name):
                    raise SchemaError(f"name {spec.name!r} is kept for another MCP server's tools "
                                      "(mcp_{server}_{tool})")
                tool = RegisteredTool(spec.name, spec.description, spec.parameters,
                                      partial(supervisor.call, spec.name), supervisor.name, "mcp" if server else "core",
                                      sender=supervisor, remote_name=spec.name)
            except SchemaError as exc:
                refused.append(spec.name)
                log.error("plugin %s: tool %s is not registered: its %s", supervisor.name,
                          printable(repr(spec.name), 100), printable(str(exc), 500))
                continue
            owner = self._name_owner(spec.name, supervisor.name)
            fallback = mcp_tool_name(supervisor.name, spec.name)
            if owner is not None and server and tool_name_problem(fallback):
                # a server named with a '-', or a long name of the server's choosing: never a crash
                conflicts.append(spec.name)
                log.error("MCP server %s: tool %s is not registered: %s has the name %s, and %s, Qanot's name for "
                          "it then, is not one Qanot can call (letters, digits and _, at most 64): a shorter server "
                          "name of those characters in config.json would give it one", supervisor.name, spec.name,
                          owner[1], spec.name, printable(repr(fallback), 120))
                self._let_go(spec.name, supervisor.name, owner[0], displaced)
                continue
            if owner is not None and server and fallback in offered:
                # the server offers that name itself: the renamed tool would take its place, and the
                # log said it was registered (attack pass 61)
                conflicts.append(spec.name)
                log.error("MCP server %s: tool %s is not registered: %s has the name %s, and %s, Qanot's name for "
                          "it then, is the name of another of the server's own tools", supervisor.name, spec.name,
                          owner[1], spec.name, fallback)
                self._let_go(spec.name, supervisor.name, owner[0], displaced)
                continue
            if owner is not None and server and not kept_for_another(fallback):
                # as Qanot names an MCP tool whose name is taken; never a name another server's fallbacks
                # take (servers s and s_calc: s's calc_eval would be mcp_s_calc_eval, s_calc's eval's place)
                log.warning("MCP server %s: tool %s is registered as %s: %s has the name %s", supervisor.name,
                            spec.name, fallback, owner[1], spec.name)
                self._let_go(spec.name, supervisor.name, owner[0], displaced)
                tool = replace(tool, name=fallback)
                owner = self._name_owner(tool.name, supervisor.name)
            if owner is not None:
                conflicts.append(tool.name)
                log.error("plugin %s: tool %s is not registered: %s has it (a name is the plugin's listed first "
                          "in config.json among those offering it)", supervisor.name, tool.name, owner[1])
                self._let_go(tool.name, supervisor.name, owner[0], displaced)
                continue
            holder = self.registry.get(tool.name)
            if holder is not None and holder.plugin and holder.plugin != supervisor.name:
                log.error("plugin %s: tool %s is no longer registered: plugin %s, listed before it in config.json, "
                          "offers it now", holder.plugin, tool.name, supervisor.name)
                self.registry.remove_tool(tool.name)
                displaced.add(holder.plugin)
            self.registry.add_plugin_tool(tool)
            tools.append(tool.name)
            for other, other_plugin in self._look_alikes.added(tool.name, supervisor.name, self._registered_to):
                log.warning("plugin %s: its tool %s looks like plugin %s's %s (they differ only in case, '-', '.' or "
                            "'_'): a model may call one for the other", supervisor.name, tool.name, other_plugin, other)
        supervisor.set_tools(tools, conflicts, refused, unknown)
        # the plugins that lost a name to it, or may take one it let go or no longer claims, register anew
        for name in freed + given_up:
            displaced |= {p for p in self._offered_by.get(name, ()) if p != supervisor.name}
        for name in sorted(displaced - {supervisor.name}, key=self._rank):
            if name in self.plugins:
                self._register_tools(self.plugins[name])

    def _let_go(self, tool: str, plugin: str, owner: str, to_register: set[str]) -> None:
        """`plugin` may not have `tool` (`owner` has it, maybe by a new order of config.json): if it
        still holds it, the name goes; and an owner that does not hold it registers anew to take it."""
        holder = self.registry.get(tool)
        if holder is not None and holder.plugin == plugin:
            self.registry.remove_tool(tool)
            holder = None
        if owner and (holder is None or holder.plugin != owner):  # the owner has it not: it registers anew
            to_register.add(owner)

    def _registered_to(self, tool: str) -> str | None:
        holder = self.registry.get(tool)
        return holder.plugin if holder is not None else None

    def _name_owner(self, tool: str, plugin: str) -> tuple[str, str] | None:
        """Who has `tool` instead of `plugin`: (the plugin listed before it that claims it, serving or
        not, and how to say so), ("", "the host") for an in-host tool, or None."""
        rank = self._rank(plugin)
        earlier = [other for other in self._offered_by.get(tool, ()) if self._rank(other) < rank]
        if earlier:
            first = min(earlier, key=self._rank)
            state = self.plugins[first].state if first in self.plugins else None
            return first, f"plugin {first}" + (f" (it is {state} now; the name waits for it)"
                                               if state is not None and state not in SERVING_STATES else "")
        holder = self.registry.get(tool)
        if holder is not None and not holder.plugin:
            return "", "the host"
        return None

    def _rank(self, plugin: str) -> int:
        """Where `plugin` stands in config.json (the MCP servers after the plugins)."""
        config, ranks = self._ranks
        if config is not self.config:
            ranks = {entry.name: i for i, entry in enumerate(self.config.plugins)}
            self._ranks = (self.config, ranks)
        return ranks.get(plugin, len(ranks))

    def _note_offer(self, plugin: str, offered: set[str], claims: set[str]) -> list[str]:
        """Keep the plugin's latest claims (the names it offers that it could have), and warn when
        its offer changed: a plugin whose tools change (a restarted worker, one brought back from
        failed, a lazy plugin's first worker against its cached list, a reload) may be after another
        plugin's tool names. Returns the names it no longer claims."""
        before = self._last_offer.get(plugin)
        self._last_offer[plugin] = offered
        claimed = self._claims.get(plugin, set())
        self._claims[plugin] = claims
        self._claim(plugin, claims - claimed, claimed - claims)
        if before is not None and before != offered:
            log.warning("plugin %s now offers other tools than at its last listing: %s", plugin,
                        printable("; ".join(part for part in (
                            "new: " + ", ".join(sorted(offered - before)) if offered - before else "",
                            "gone: " + ", ".join(sorted(before - offered)) if before - offered else "") if part),
                            2000))
        return sorted(claimed - claims)

    def _forget_offer(self, plugin: str) -> None:
        """A plugin removed from config.json: its names no longer wait for it."""
        self._last_offer.pop(plugin, None)
        self._claim(plugin, set(), self._claims.pop(plugin, set()))

    def _claim(self, plugin: str, names: set[str], given_up: set[str]) -> None:
        for name in names:
            self._offered_by.setdefault(name, set()).add(plugin)
        for name in given_up:
            claimants = self._offered_by.get(name)
            if claimants is not None:
                claimants.discard(plugin)
                if not claimants:
                    del self._offered_by[name]

    # ---- running ---------------------------------------------------------------------------------

    async def reload(self, config: Config | None = None) -> dict[str, list[str]]:
        """Read config.json again: start new plugins, stop removed ones, restart changed ones (and
        failed ones: a reload is how an operator acts). Untouched plugins keep serving. Reloads and
        restarts run one at a time (two at once once started a plugin twice, one of them unseen)."""
        async with self._operating:
            return await self._reload(config)

    async def _reload(self, config: Config | None) -> dict[str, list[str]]:
        new = config or load_config(self.config.path)
        old = self.config
        # checked as at the start, before anything stops: a reload once took another user's state_dir
        # or workspace_dir that check and a fresh start refuse
        if new.host.state_dir != old.host.state_dir:
            raise ConfigError(f"{new.path}: host.state_dir: changed from {old.host.state_dir} to "
                              f"{new.host.state_dir}: this host keeps its control socket, disks and uids in the "
                              "first; restart it to use another")
        problems = await asyncio.to_thread(directory_problems, new, True)
        if problems:
            raise ConfigError(problems[0])
        wanted = [e.name for e in new.plugins if e.enabled]
        removed = [name for name in self.plugins if name not in wanted]
        changed = [name for name in wanted if name in self.plugins and (
            old.settings_for(name) != new.settings_for(name)
            or old.limits_for(name) != new.limits_for(name)  # host.limits' defaults too
            or old.host.sandbox != new.host.sandbox
            or self.plugins[name].entry != next(e for e in new.plugins if e.name == name)
            or self.plugins[name].state in (PluginState.FAILED, PluginState.EXITED))]
        # ...and those whose code or plugin.json changed (or that are now found elsewhere)
        for name in [n for n in wanted if n in self.plugins and n not in changed]:
            now = await asyncio.to_thread(_current_fingerprint, name, new)
            if now is None or now != self._fingerprints.get(name):
                changed.append(name)
        added = [name for name in wanted if name not in self.plugins]
        staying = [name for name in wanted if name in self.plugins]  # restarted ones too
        reordered = _order(old, staying) != _order(new, staying)
        let_go = set().union(*(self._claims.get(name, set()) for name in removed))
        for name in removed:
            self._forget_offer(name)  # its names wait for it no more; a plugin added back later is a new one
        # from their stop to their start, the names of the plugins that restart are no other's to take
        self._registration_paused = True
        try:
            await asyncio.gather(
                self._stop_plugins(removed, f"it is being removed by a reload of {new.path}"),
                self._stop_plugins(changed, f"it is being restarted by a reload of {new.path}; call again once "
                                            "it is ready"))
            # a removed plugin's disk, and one whose disk_mb changed (to be grown), are let go
            resized = [n for n in changed if old.limits_for(n).disk_mb != new.limits_for(n).disk_mb]
            # and the places no start will measure again: a removed plugin's, one given workspace: false
            placeless = [(n, "removed") for n in removed] + [
                (n, "left without one") for n in changed if old.has_place(n) and not new.has_place(n)]
            await asyncio.gather(*(self._factory.release_disk(name) for name in [*removed, *resized]),
                                 *(self._measure_left_place(name, how, old) for name, how in placeless))
            self.config = new
            self.registry.timeout = new.host.call_timeout
            self.workspace = Workspace(new.workspace_dir)
            self._envs = self._environment_builder(new)
            self._factory.config = new
            for supervisor in self.plugins.values():
                supervisor.rebind(new)
            present = set(self.plugins)
            for tool in let_go:  # the next plugin in line for a removed plugin's names takes them
                self._held_registrations |= self._offered_by.get(tool, set()) & present
            if reordered:  # a new order decides contested names anew
                for claimants in self._offered_by.values():
                    if len(claimants) > 1:
                        self._held_registrations |= claimants & present
            self._index.forget()
            await self._start_plugins([name for name in wanted if name in changed or name in added])
        finally:
            self._registration_paused = False
            self._register_held()
        self._index.build_if_useful(new, self.plugins)
        summary = {"added": added, "removed": removed, "restarted": changed,
                   "unchanged": [n for n in wanted if n not in changed and n not in added],
                   # of those it started: an operator's script is told, not only the log (status says why)
                   "failed": [n for n in [*added, *changed] if n in self.plugins and _start_failed(self.plugins[n])]}
        log.info("reloaded %s: %s", new.path,
                 "; ".join(f"{key} {', '.join(names) or '-'}" for key, names in summary.items()))
        return summary

    async def _measure_left_place(self, name: str, how: str, old: Config) -> None:
        """What a teardown() wrote in a place in the workspace no start will measure again (its plugin
        removed, or given `workspace: false`) stays there (attack pass 63: 3 GB, with nothing said):
        measured once its worker is gone, and said if over its ceiling."""
        problem = await self._factory.place_problem(name, old.limits_for(name).workspace_mb)
        if problem:
            log.error("plugin %s, %s by this reload: its place in the workspace is full: %s (its files stay "
                      "until someone removes them)", name, how, problem)

    async def _stop_plugins(self, names: list[str], why: str) -> None:
        """`why`: what a call to one of them is told while it stops."""
        supervisors = [self.plugins.pop(name) for name in names]
        await asyncio.gather(*(s.stop(why) for s in supervisors), return_exceptions=True)
        for supervisor in supervisors:
            self.registry.remove_plugin_tools(supervisor.name)

    # ---- stop ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """No new calls; calls in flight finish (up to host.shutdown_deadline); then teardown() in
        every worker, SIGTERM, SIGKILL. Always ends; safe to call more than once."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self._index.close()
        for supervisor in self.plugins.values():
            supervisor.close_to_calls()
        try:
            await asyncio.wait_for(asyncio.gather(*(s.idle.wait() for s in self.plugins.values())),
                                   self.config.host.shutdown_deadline)
        except asyncio.TimeoutError:
            pass  # what is still in flight ends with the workers
        await asyncio.gather(*(s.stop() for s in self.plugins.values()), return_exceptions=True)
        for supervisor in self.plugins.values():
            self.registry.remove_plugin_tools(supervisor.name)
        for supervisor in self.plugins.values():
            await self._factory.cgroups.kill(supervisor.name)
        await self._factory.close()
        if self.metrics is not None:
            await self.metrics.close()

    def worker_pids(self) -> set[int]:
        """Every running worker's pid, and the worker template's (they all run plugin-reachable code)."""
        pids = {s.worker.pid for s in self.plugins.values() if s.worker and s.worker.pid}
        launcher = self._factory.launcher
        return pids | (launcher.helper_pids() if launcher is not None else set())

    def logs(self, plugin: str) -> LogRing:
        """The plugin's recent output lines (PluginUnavailable naming it if it is not configured)."""
        ring = self._factory.rings.get(plugin)
        if ring is None:
            if plugin not in self.plugins:
                raise PluginUnavailable(plugin, f"no plugin {plugin!r} in {self.config.path}")
            ring = self._factory.rings.setdefault(plugin, LogRing())
        return ring

    async def restart_plugin(self, plugin: str) -> dict[str, Any]:
        """Restart one plugin: a running worker finishes its calls in flight first (up to its longest
        call timeout), then is replaced; a failed or exited plugin is started anew. Its status after."""
        async with self._operating:
            supervisor = self.plugins.get(plugin)
            if supervisor is None:
                raise PluginUnavailable(plugin, f"no enabled plugin {plugin!r} in {self.config.path}")
            # A start or restart under way ends first: a call waiting for it (a lazy plugin's first
            # call) is then drained with the ready worker, not failed by stopping the one starting.
            await supervisor.settled.wait()
            if supervisor.state == PluginState.READY:
                supervisor.recycle("restarted by the operator", counts=False, label="operator")  # drains first
                await supervisor.settled.wait()
            else:
                await self._stop_plugins([plugin], "it is being restarted by the operator; call again once it is ready")
                cache = self._factory.tool_cache
                kept = cache.load(plugin, supervisor.offer_key) if supervisor.offer_key else None
                cache.forget(plugin)  # an idle lazy plugin lists its tools anew
                await self._start_plugins([plugin])
                now = self.plugins[plugin]
                if kept is not None and now.state not in SERVING_STATES:
                    cache.store(plugin, kept)  # nothing listed anew: the last good list is not lost
                    if now.lazy and now.state == PluginState.FAILED and kept.key == now.offer_key:
                        # That listing failed (a setup() that fails now and then), its code unchanged:
                        # its tools are registered from the last list again, each call trying the start.
                        why = now.error
                        await self._start_plugins([plugin])
                        if self.plugins[plugin].state == PluginState.IDLE:
                            log.warning("plugin %s: restarted, but listing its tools anew failed (%s); its last "
                                        "list is served, and its next call starts it", plugin, why)
        status = self.plugins[plugin].status()
        log.info("plugin %s restarted by the operator: %s", plugin, status["state"])
        return status

    @property
    def stopping(self) -> bool:
        return self._stopping

    def install_seconds(self) -> dict[str, float]:
        """Per plugin, the time its dependency environments took to build, since the host started."""
        return dict(self._install_seconds)

    @staticmethod
    def frame_counts() -> tuple[int, int]:
        """Protocol frames (sent, received) through every worker channel of this process."""
        return FRAMES.sent, FRAMES.received

    def template_starts(self) -> int:
        return getattr(self._factory.launcher, "template_starts", 0)

    def tool_definitions(self) -> list[dict[str, Any]]:
        """Every registered tool as Qanot defines it, with the plugin that offers it (None: the host's)."""
        tools = (self.registry.get(name) for name in self.registry.tool_names)
        return [dict(tool.definition(), plugin=tool.plugin) for tool in tools if tool is not None]

    def not_ready(self) -> str:
        """"NAME: why; ..." for each plugin that is not ready ("" when all are)."""
        return "; ".join(f"{row['plugin']}: {row['error']}" for row in self.status()
                         if row["state"] not in SERVING_STATES)

    def status(self) -> list[dict[str, Any]]:
        return [supervisor.status() for supervisor in self.plugins.values()]


def _names(plugins: list[str], shown: int = 5) -> str:
    """"plugins a, b and c" (the first `shown` of them, and how many more)."""
    head = ", ".join(plugins[:shown]) + (f" and {len(plugins) - shown} more" if len(plugins) > shown else "")
    return f"plugin{'s' if len(plugins) > 1 else ''} {head}"


def _may_retry(exc: PluginError) -> bool:
    """A start that failed in the worker (its setup() raised or timed out, it crashed), not one the
    host refused as configured, nor an environment or protocol that another try would not change."""
    return isinstance(exc, (PluginStartError, WorkerTimeout)) and \
        not isinstance(exc, (StartRefused, DependencyError, ProtocolMismatch))


def _order(config: Config, plugins: Iterable[str]) -> list[str]:
    """The order config.json gives these plugins."""
    names = set(plugins)
    return [entry.name for entry in config.plugins if entry.name in names]


def _fingerprint(source: PluginSource, config: Config) -> str:
    """Where the plugin is, and what its directory holds (for an MCP server, also its installation):
    a change restarts it at reload, and keys its cached tool list anew."""
    own = f"{source.directory}:{plugin_fingerprint(source.directory)}"
    return own + (f":{install_stamp(config, source.name)}" if mcp_server(config, source.name) else "")


class _Fingerprinting:
    """The fingerprints asked for in one loop turn (every plugin starting together), taken in one
    hop to a thread: one hop each, 2000 lazy plugins' warm start took 1.0-1.7 s, 0.6-1.0 s without
    the hops; the files are still read off the event loop."""

    def __init__(self) -> None:
        self._asked: list[tuple[PluginSource, Config, asyncio.Future[str]]] = []

    def of(self, source: PluginSource, config: Config) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        if not self._asked:
            loop.call_soon(self._take)  # after the first steps of the starts already scheduled
        future: asyncio.Future[str] = loop.create_future()
        self._asked.append((source, config, future))
        return future

    def _take(self) -> None:
        asked, self._asked = self._asked, []
        taking = asyncio.get_running_loop().run_in_executor(None, _fingerprint_each, [(s, c) for s, c, _ in asked])

        def settle(taking: asyncio.Future) -> None:
            for index, (_, _, future) in enumerate(asked):
                if future.done():
                    continue  # its start was cancelled meanwhile
                if taking.cancelled():
                    future.cancel()
                elif taking.exception() is not None:
                    future.set_exception(taking.exception())  # type: ignore[arg-type]
                elif isinstance(found := taking.result()[index], BaseException):
                    future.set_exception(found)
                else:
                    future.set_result(found)
        taking.add_done_callback(settle)


def _fingerprint_each(asked: list[tuple[PluginSource, Config]]) -> list[str | BaseException]:
    found: list[str | BaseException] = []
    for source, config in asked:
        try:
            found.append(_fingerprint(source, config))
        except Exception as exc:  # noqa: BLE001 - that plugin's start reports it, the others go on
            found.append(exc)
    return found


def _current_fingerprint(plugin: str, config: Config) -> str | None:
    """The plugin's fingerprint as it is found now under `config` (None: it is not found)."""
    source = find_plugin(plugin, config)
    return _fingerprint(source, config) if source is not None else None


def _start_failed(supervisor: PluginSupervisor) -> bool:
    """Failed, or its start failed and its restart policy tries again (an MCP server: a reload said
    "added" and exited 0 for one that never started, compat pass 57)."""
    return supervisor.state is PluginState.FAILED or (
        supervisor.state in (PluginState.RESTARTING, PluginState.STARTING) and bool(supervisor.error))
