"""Qanot's plugin loader (`qanot.plugins.loader`), served by qanot-host: one import switches a Qanot
deployment over, and every plugin then runs in a sandboxed worker instead of the agent's process.

In Qanot's main.py::

    from qanot_host.qanot_loader import get_plugin_manager, load_plugins, shutdown_plugins

Everything Qanot does with its own loader keeps working: `load_plugins(config, registry)` reads
Qanot's own `Config` (its `plugins`, `plugins_dir`, `workspace_dir`) and registers each plugin's
tools in Qanot's own `ToolRegistry` (a call through its `execute()` reaches the worker);
`get_plugin_manager().loaded_plugins` maps each loaded plugin to a proxy that is a real subclass of
Qanot's `Plugin`, so `HookRegistry.register_plugin` registers the hooks the plugin overrides, and
only those, each forwarded to the worker (`on_pre_turn` can change the message); the extension
points return what the worker's plugin returned at load; `shutdown_plugins()` tears every worker
down. Plugins are found in Qanot's order: plugins_dir, ~/.qanot/plugins, Qanot's bundled plugins.
The TOOLS.md and SOUL.md files are written by Qanot's own loader code, as Qanot writes them.

qanot-host's own settings (grants, limits, state_dir) come from the JSON file that
QANOT_HOST_SETTINGS names, holding what config.json's "host" key would hold.

What cannot cross the process boundary: a command handler (get_commands) is called in the worker
with arguments and a return value that JSON can hold; `on_error` gets the error as its text
(an Exception rebuilt in the worker). What the extension points return is still the plugin's:
Qanot compiles its WAL patterns and puts its prompt sections in the agent's prompt.
"""

from __future__ import annotations

import json
import logging
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

from . import qanot_extensions as extension_points
from .config import parse_config
from .errors import ConfigError, PluginError
from .host import Host
from .output import printable
from .registry import tool_name_problem
from .schema import json_problem
from .settings import Config
from .supervisor import PluginState, PluginSupervisor

__all__ = ["PluginManager", "load_plugins", "shutdown_plugins", "get_plugin_manager", "SETTINGS_ENV"]

# Qanot's own logger name: its log lines look as they did before the switch.
log = logging.getLogger("qanot.plugins.loader")

SETTINGS_ENV = "QANOT_HOST_SETTINGS"
# The keyword arguments Qanot's HookRegistry.fire passes to each hook.
HOOK_PARAMETERS = {
    "on_pre_turn": ("user_id", "message"), "on_post_turn": ("user_id", "message", "response"),
    "on_tool_use": ("user_id", "tool_name", "tool_input", "result"), "on_error": ("tool_name", "error"),
    "on_startup": (), "on_shutdown": (), "on_compaction": ("user_id", "before_tokens", "after_tokens"),
}
TEXT_HOOKS = ("on_pre_turn", "on_post_turn")  # a non-None return replaces the agent's text
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
class PluginManager:
    """Qanot's PluginManager, each plugin in a qanot-host worker."""

    def __init__(self) -> None:
        self._plugins: dict[str, Any] = {}
        self._manifests: dict[str, Any] = {}
        self.host: Host | None = None

    @property
    def loaded_plugins(self) -> dict[str, Any]:
        return dict(self._plugins)

    def get_plugin(self, name: str) -> Any:
        return self._plugins.get(name)

    def get_manifest(self, name: str) -> Any:
        return self._manifests.get(name)

    async def load_all(self, config: Any, registry: Any) -> None:
        """Start every enabled plugin of Qanot's config in a worker and register its tools in
        `registry`, in config order (a later plugin's tool overrides an earlier one, as in Qanot).
        Like Qanot's, it never raises for a plugin: each failure is logged and the rest load."""
        if self.host is not None:
            await self.shutdown_all()
        entries = _entries(config)
        self._listed = {entry["name"] for entry in entries}  # disabled ones too: their NAME_TOOLS.md stays
        try:
            self.host = Host(_host_config(config, entries))
            await self.host.start()
        except (ConfigError, PluginError, OSError) as exc:
            log.error("qanot-host could not start, no plugin is loaded: %s", exc)
            self.host = None
            return
        for entry in entries:
            if not entry["enabled"]:
                log.info("Plugin %s is disabled, skipping", entry["name"])
                continue
            try:
                self._adopt(entry["name"], config, registry)
            except Exception as exc:
                log.error("Failed to load plugin '%s': %s", entry["name"], exc, exc_info=True)

    def _adopt(self, name: str, config: Any, registry: Any) -> None:
        log.info("Loading plugin: %s", name)
        assert self.host is not None
        supervisor = self.host.plugins[name]
        if not supervisor.serving or supervisor.offer is None:
            log.error("Failed to load plugin '%s': %s", name, supervisor.error or f"it is {supervisor.state}")
            return
        manifest = _manifest(supervisor)
        log.info("Plugin %s v%s by %s", manifest.name, manifest.version, manifest.author or "unknown")
        # Another plugin's name (its directory's, or one a plugin loaded before took) is never a
        # plugin's own: Qanot writes NAME_TOOLS.md by it, which would replace the other's.
        taken = self._listed - {name} | {proxy.name for proxy in self._plugins.values()}
        proxy = _proxy(supervisor, taken)
        tools = proxy.get_tools()
        conflicts = [tool.name for tool in tools if tool.name in registry.tool_names]
        if conflicts:
            log.warning("Plugin '%s' has tool name conflicts: %s — plugin tools will override", name,
                        ", ".join(conflicts))
        for tool in tools:
            registry.register(name=tool.name, description=tool.description, parameters=tool.parameters,
                              handler=tool.handler)
        _deploy(config, proxy)
        self._plugins[name] = proxy
        self._manifests[name] = manifest
        log.info("Plugin %s loaded: %d tools (%s)", name, len(tools), ", ".join(t.name for t in tools))

    async def shutdown_all(self) -> None:
        host, self.host = self.host, None
        if host is not None:
            await host.stop()
            for name, supervisor in host.plugins.items():
                if name in self._plugins:
                    if supervisor.error and supervisor.state is PluginState.FAILED:
                        log.error("Plugin %s teardown failed: %s", name, supervisor.error)
                    else:
                        log.info("Plugin %s shut down", name)
        self._plugins.clear()
        self._manifests.clear()
        extension_points.forget_template_vars()


def _entries(config: Any) -> list[dict[str, Any]]:
    """Qanot's plugin list as plain entries. A name listed twice: the last one counts (in Qanot it
    replaces the first); a config JSON cannot hold: that plugin is left out, with an error."""
    entries: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(getattr(config, "plugins", []) or []):
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            log.error("Failed to load plugins[%d]: its name is %r, not a string", index, name)
            continue
        plugin_config = getattr(item, "config", None) or {}
        problem = json_problem(plugin_config, f"plugins[{index}].config")
        if problem:
            log.error("Failed to load plugin '%s': %s", name, problem)
            continue
        if name in entries:
            log.warning("Plugin %s is listed twice in plugins; the later entry is used", name)
            del entries[name]
        entries[name] = {"name": name, "enabled": bool(getattr(item, "enabled", True)), "config": plugin_config}
    return list(entries.values())


def _host_config(config: Any, entries: list[dict[str, Any]]) -> Config:
    settings: dict[str, Any] = {}
    path = os.environ.get(SETTINGS_ENV)
    if path:
        try:
            with open(path, "rb") as file:
                settings = json.load(file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} (from ${SETTINGS_ENV}): {exc}") from None
        if not isinstance(settings, dict):
            raise ConfigError(f"{path} (from ${SETTINGS_ENV}): must hold a JSON object (config.json's \"host\")")
    settings.setdefault("state_dir", str(Path.home() / ".qanot" / "host"))
    settings.setdefault("search_path", [str(config.plugins_dir), *map(str, _qanot_plugin_dirs())])
    settings["workspace_docs"] = False  # Qanot's own code writes them (_deploy)
    data = {"plugins": entries, "plugins_dir": str(config.plugins_dir),
            "workspace_dir": str(config.workspace_dir), "host": settings}
    label = path or os.environ.get("QANOT_CONFIG", "qanot config")
    return parse_config(json.dumps(data), label)


def _qanot_plugin_dirs() -> list[Path]:
    """~/.qanot/plugins and Qanot's bundled plugins, as Qanot's loader looks there."""
    dirs = []
    try:
        from qanot.plugins.registry import USER_PLUGINS_DIR
        dirs.append(Path(USER_PLUGINS_DIR))
    except ImportError:
        dirs.append(Path.home() / ".qanot" / "plugins")
    try:
        from qanot.plugins.loader import BUILTIN_PLUGINS_DIR
        dirs.append(Path(BUILTIN_PLUGINS_DIR))
    except ImportError:
        pass
    return dirs


def _manifest(supervisor: PluginSupervisor) -> Any:
    from qanot.plugins.base import PluginManifest
    source = supervisor.source
    assert source is not None
    path = Path(source.directory) / "plugin.json"
    return PluginManifest.from_file(path) if path.exists() else PluginManifest.default(supervisor.name)


def _proxy(supervisor: PluginSupervisor, taken: set[str]) -> Any:
    """An instance of a subclass of Qanot's Plugin standing for the worker's plugin (`taken`: names
    that are other plugins')."""
    from qanot.plugins.base import Plugin, ToolDef
    offer = supervisor.offer  # a lazy plugin's from the tool cache: its worker starts at its first call
    assert offer is not None
    info, extensions = offer.info, offer.extensions
    name = info.name
    if name and not SAFE_NAME.fullmatch(name):  # match() would let a trailing newline through
        log.warning("Plugin %s names itself %r, which Qanot would use in a file name; it is called %s here",
                    supervisor.name, name[:80], supervisor.name)
        name = supervisor.name
    elif name in taken:
        log.warning("Plugin %s names itself %r, another plugin's name; it is called %s here", supervisor.name,
                    name, supervisor.name)
        name = supervisor.name
    # what the host refused (a schema it cannot use), and a name Qanot cannot call (which the host
    # registers for MCP clients only), are not registered here (the host has logged why)
    tools = [ToolDef(tool.name, tool.description, tool.parameters, partial(supervisor.call, tool.name))
             for tool in offer.tools if not tool.problem and tool.name not in supervisor.refused
             and tool_name_problem(tool.name) is None]
    for tool in offer.tools:
        if tool.problem:
            log.error("Plugin %s: tool %r is not registered: its %s", supervisor.name, tool.name, tool.problem)
    for problem in extensions.problems:
        log.warning("Plugin %s: %s", supervisor.name, printable(problem, 500))
    ext = extension_points
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"Stands for plugin {supervisor.name}, which runs in a qanot-host worker.",
        "name": name, "description": ext.plain_text(info.description), "version": ext.one_line(info.version),
        "tools_md": ext.capped(supervisor.name, "tools_md", info.tools_md),
        "soul_append": ext.capped(supervisor.name, "soul_append", info.soul_append),
        "get_tools": lambda self: list(tools),
        "get_wal_patterns": lambda self: ext.wal_patterns(supervisor.name, extensions.wal_patterns),
        "get_prompt_sections": lambda self: ext.flat_dicts(supervisor.name, "prompt sections",
                                                           extensions.prompt_sections),
        "get_template_dir": lambda self: _template_dir(supervisor, extensions.template_dir),
        "get_cron_jobs": lambda self: ext.flat_dicts(supervisor.name, "cron jobs", extensions.cron_jobs),
        "get_commands": lambda self: [
            {"command": ext.one_line(spec.command), "description": ext.one_line(spec.description),
             "handler": _command_forwarder(supervisor, index)}
            for index, spec in enumerate(extensions.commands)],
        "get_template_vars": lambda self: ext.template_vars(supervisor.name, extensions.template_vars),
        "qanot_host_plugin": supervisor.name,
    }
    for hook in info.hooks:
        if hook in HOOK_PARAMETERS:
            namespace[hook] = _hook_forwarder(supervisor, hook)
    cls = type(f"WorkerPlugin_{supervisor.name}", (Plugin,), namespace)
    return cls()


def _hook_forwarder(supervisor: PluginSupervisor, hook: str):
    names = HOOK_PARAMETERS[hook]

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(names, args, strict=False))  # Qanot passes them by keyword, mostly
        error = kwargs.get("error")
        if isinstance(error, BaseException):
            kwargs["error"] = f"{type(error).__name__}: {error}"
        value = await supervisor.hook(hook, kwargs)
        if hook in TEXT_HOOKS and value is not None and not isinstance(value, str):
            raise PluginError(supervisor.name, f"hook {hook} returned {type(value).__name__}, expected str or None")
        return value if hook in TEXT_HOOKS else None

    forward.__name__ = forward.__qualname__ = hook
    return forward


def _command_forwarder(supervisor: PluginSupervisor, index: int):
    async def command(*args: Any, **kwargs: Any) -> Any:
        return await supervisor.run_command(index, list(args), kwargs)

    return command


def _template_dir(supervisor: PluginSupervisor, directory: str | None) -> str | None:
    """The plugin's templates, only from its own directory (Qanot reads what is there)."""
    if not directory or supervisor.source is None:
        return None
    own = os.path.realpath(supervisor.source.directory)
    real = os.path.realpath(os.path.join(own, directory))
    if real != own and not real.startswith(own + os.sep):
        log.warning("Plugin %s: template dir %s is outside the plugin's directory; left out", supervisor.name,
                    directory)
        return None
    return real


def _deploy(config: Any, proxy: Any) -> None:
    """TOOLS and SOUL files, and the extension points, by Qanot's own loader code."""
    try:
        from qanot.plugins.loader import PluginManager as QanotManager
        from qanot.plugins.loader import _deploy_plugin_files
        collect = QanotManager._collect_extensions  # uses nothing of the manager's own state
    except (ImportError, AttributeError):
        log.warning("this Qanot has no _deploy_plugin_files/PluginManager._collect_extensions: plugin %s's "
                    "TOOLS.md, SOUL.md and extension points are not installed", proxy.qanot_host_plugin)
        return
    _deploy_plugin_files(config.workspace_dir, proxy)
    try:
        from qanot import memory
        patterns: list | None = memory.WAL_PATTERNS
    except (ImportError, AttributeError):
        patterns = None
    first = len(patterns) if patterns is not None else 0
    collect(None, proxy)  # type: ignore[arg-type]
    if patterns is not None:
        extension_points.time_wal_patterns(proxy.qanot_host_plugin, patterns, first)


_manager = PluginManager()


async def load_plugins(config: Any, registry: Any) -> None:
    await _manager.load_all(config, registry)


async def shutdown_plugins() -> None:
    await _manager.shutdown_all()


def get_plugin_manager() -> PluginManager:
    return _manager
