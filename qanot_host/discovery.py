"""Find a plugin's directory and read its plugin.json, without running any of its code.

Qanot's order: the built-in plugins/ directory at the package root first, then plugins_dir.
plugin.py is the entry point; __init__.py is accepted when plugin.py is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .manifest import PERMISSIONS, QANOT_API_VERSION, Manifest, ManifestError, parse_version, read_manifest

from .config import Config, PluginEntry

__all__ = ["PluginSource", "builtin_plugins_dir", "find_plugin", "searched_paths", "manifest_problems"]

ENTRY_FILES = ("plugin.py", "__init__.py")


@dataclass
class PluginSource:
    name: str
    directory: str
    entry_file: str
    builtin: bool
    manifest: Manifest
    problem: str = ""  # a plugin.json that exists but cannot be used: the plugin does not start


def builtin_plugins_dir(config: Config) -> str:
    if config.host.builtin_plugins_dir is not None:
        return config.host.builtin_plugins_dir
    return str(Path(__file__).resolve().parent.parent / "plugins")


def find_plugin(name: str, config: Config) -> PluginSource | None:
    """The first of builtin/NAME and plugins_dir/NAME that has an entry file, or None."""
    for root, builtin in ((builtin_plugins_dir(config), True), (config.plugins_dir, False)):
        directory = os.path.join(root, name)
        for entry in ENTRY_FILES:
            entry_file = os.path.join(directory, entry)
            if os.path.isfile(entry_file):
                try:
                    return PluginSource(name, directory, entry_file, builtin, read_manifest(directory))
                except ManifestError as exc:
                    return PluginSource(name, directory, entry_file, builtin, Manifest(name=name), str(exc))
    return None


def searched_paths(name: str, config: Config) -> str:
    return " or ".join(os.path.join(root, name, "plugin.py")
                       for root in (builtin_plugins_dir(config), config.plugins_dir))


def manifest_problems(source: PluginSource, entry: PluginEntry) -> list[str]:
    """What plugin.json asks for that this host or this config cannot give (required keys, version)."""
    problems = []
    path = os.path.join(source.directory, "plugin.json")
    missing = [key for key in source.manifest.required_config if key not in entry.config]
    if missing:
        problems.append(f"{path}: required_config: missing from the plugin's config in config.json: "
                        + ", ".join(missing))
    unknown = [name for name in source.manifest.permissions if name not in PERMISSIONS]
    if unknown:
        problems.append(f"{path}: permissions: unknown {', '.join(map(repr, unknown))} "
                        f"(known: {', '.join(PERMISSIONS)})")
    wanted = source.manifest.min_qanot_version
    if wanted and parse_version(wanted) > parse_version(QANOT_API_VERSION):
        problems.append(f"{path}: min_qanot_version: needs Qanot plugin API {wanted}, "
                        f"this host implements {QANOT_API_VERSION}")
    return problems
