"""Find a plugin's directory and read its plugin.json, without running any of its code.

The order is the brief's: the built-in plugins/ directory at the package root first, then
plugins_dir; `host.search_path` replaces it (the Qanot drop-in sets Qanot's own order there).
plugin.py is the entry point; __init__.py is accepted when plugin.py is missing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import PERMISSIONS, QANOT_API_VERSION, Manifest, ManifestError, parse_version, read_manifest
from .mcp_servers import BRIDGE_REQUIREMENT, mcp_server
from .settings import Config, PluginEntry

__all__ = ["PluginSource", "builtin_plugins_dir", "find_plugin", "shadowed", "bridge_source", "search_path",
           "searched_paths",
           "manifest_problems", "manifest_warnings"]

ENTRY_FILES = ("plugin.py", "__init__.py")


@dataclass
class PluginSource:
    name: str
    directory: str
    entry_file: str
    builtin: bool
    manifest: Manifest
    problem: str = ""  # a plugin.json that exists but cannot be used: the plugin does not start
    warnings: list[str] = field(default_factory=list)  # what was read leniently, as Qanot reads it


def builtin_plugins_dir(config: Config) -> str:
    if config.host.builtin_plugins_dir is not None:
        return config.host.builtin_plugins_dir
    return str(Path(__file__).resolve().parent / "builtin_plugins")


def search_path(config: Config) -> list[tuple[str, bool]]:
    """(directory, is_builtin) in the order plugins are looked for."""
    if config.host.search_path is not None:
        builtin = builtin_plugins_dir(config)
        return [(root, root == builtin) for root in config.host.search_path]
    return [(builtin_plugins_dir(config), True), (config.plugins_dir, False)]


def find_plugin(name: str, config: Config) -> PluginSource | None:
    """The first directory NAME on the search path that has an entry file, or None; for an MCP
    server of config.json, the bridge that runs it."""
    bridge = bridge_source(config, name)
    if bridge is not None:
        return bridge
    for root, builtin in search_path(config):
        directory = os.path.join(root, name)
        for entry in ENTRY_FILES:
            entry_file = os.path.join(directory, entry)
            if os.path.isfile(entry_file):
                # The worker is shown the real path: its root holds the directory there, not the links
                directory, entry_file = _real_path(root, name), _real_path(root, name, entry)
                try:
                    manifest, warnings = read_manifest(directory)
                except ManifestError as exc:
                    return PluginSource(name, directory, entry_file, builtin, Manifest(name=name), str(exc))
                return PluginSource(name, directory, entry_file, builtin, manifest, warnings=warnings)
    return None


def shadowed(source: PluginSource, config: Config) -> list[str]:
    """The directories of the same name, later on the search path, that `source` hides: a plugin a
    user put in plugins_dir under a built-in's name never runs (a newcomer's `weather`, 11-27)."""
    hidden, seen = [], False
    for root, _ in search_path(config):
        directory = os.path.join(root, source.name)
        if not seen:
            seen = os.path.realpath(directory) == os.path.realpath(source.directory)
            continue
        if any(os.path.isfile(os.path.join(directory, entry)) for entry in ENTRY_FILES):
            hidden.append(directory)
    return hidden


def _real_path(root: str, *names: str) -> str:
    """os.path.realpath(root/names...), with the root's own resolved once a second: a host starting
    2000 plugins resolved the same root 4000 times (a dozen lstat() calls each)."""
    now = time.monotonic()
    cached = _real_roots.get(root)
    if cached is None or now - cached[0] > 1.0:
        cached = _real_roots[root] = (now, os.path.realpath(root))
    path = cached[1]
    for name in names:
        path = os.path.join(path, name)
        if os.path.islink(path):
            return os.path.realpath(os.path.join(root, *names))
    return path


_real_roots: dict[str, tuple[float, str]] = {}


def bridge_source(config: Config, name: str) -> PluginSource | None:
    """The bridge, as the source of server NAME's worker (None: NAME is no MCP server)."""
    if mcp_server(config, name) is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bridge = os.path.realpath(os.path.join(root, "qanot_worker", "mcp_bridge"))
    manifest = Manifest(name=name, description=f"MCP server {name}", dependencies=[BRIDGE_REQUIREMENT])
    return PluginSource(name, bridge, os.path.join(bridge, "plugin.py"), True, manifest)


def searched_paths(name: str, config: Config) -> str:
    return " or ".join(os.path.join(root, name, "plugin.py") for root, _ in search_path(config))


def _missing_required(source: PluginSource, entry: PluginEntry) -> list[str]:
    # Qanot's test: a key whose value is falsy ("", 0, null, {}) counts as missing too.
    return [key for key in source.manifest.required_config if not entry.config.get(key)]


def manifest_problems(source: PluginSource, entry: PluginEntry, config: Config) -> list[str]:
    """What plugin.json asks for that this host or this config cannot give: the plugin does not start."""
    problems = []
    path = os.path.join(source.directory, "plugin.json")
    missing = _missing_required(source, entry)
    if missing and config.host.strict_required_config:
        problems.append(f"{path}: required_config: missing from the plugin's config in config.json: "
                        f"{', '.join(missing)} (host.strict_required_config refuses it)")
    unknown = [name for name in source.manifest.permissions if name not in PERMISSIONS]
    if unknown:
        problems.append(f"{path}: permissions: unknown {', '.join(map(repr, unknown))} "
                        f"(known: {', '.join(PERMISSIONS)})")
    wanted = source.manifest.min_qanot_version
    if wanted and parse_version(wanted) > parse_version(QANOT_API_VERSION):
        problems.append(f"{path}: min_qanot_version: needs Qanot plugin API {wanted}, "
                        f"this host implements {QANOT_API_VERSION}")
    return problems


def manifest_warnings(source: PluginSource, entry: PluginEntry, config: Config) -> list[str]:
    """What is odd but, as in Qanot, does not stop the plugin: missing required_config keys (the
    plugin decides what it can do without them) and leniently read plugin.json fields."""
    warnings = list(source.warnings)
    missing = _missing_required(source, entry)
    if missing and not config.host.strict_required_config:
        warnings.append(f"{os.path.join(source.directory, 'plugin.json')}: required_config: missing from the "
                        f"plugin's config in config.json: {', '.join(missing)} — it may not work correctly")
    return warnings
