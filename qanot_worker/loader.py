"""Import one plugin the way Qanot 2.0.4's loader does, inside the worker.

What Qanot does, this does: the entry file is plugin.py (else __init__.py), run as module
`plugin_<dir>`; the plugin's directory goes first on sys.path, so `import helpers` finds a sibling;
the class is `QanotPlugin` if there is one, else the first Plugin subclass in dir() order; it is built
with no arguments. The one addition is `plugins.<dir>`: Qanot's bundled plugins import themselves
through its installed `plugins` package (`from plugins.cloud_reporter.reporter import ...`), so the
worker answers that name, and that name only, with the plugin's own directory. No other plugin
becomes importable, and an entry file may use relative imports (`from .helpers import x`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import site
import sys
import types

from .plugin_api import Plugin, ToolDef

__all__ = ["PluginLoadError", "load_plugin", "find_plugin_class", "check_tools"]

log = logging.getLogger("qanot_worker")

# The package Qanot's wheel installs next to `qanot`, holding its bundled plugins.
PLUGINS_PACKAGE = "plugins"


class PluginLoadError(Exception):
    """The plugin could not be turned into an instance; the message says why."""


def load_plugin(name: str, plugin_file: str, plugin_dir: str, site_dirs: list[str]) -> Plugin:
    for site_dir in site_dirs:
        # addsitedir also runs the environment's .pth files, which is why the worker starts with -S.
        site.addsitedir(site_dir)
    if plugin_dir not in sys.path:
        sys.path.insert(0, plugin_dir)
    dir_name = os.path.basename(os.path.normpath(plugin_dir))
    sys.meta_path.insert(0, OwnPackageFinder(dir_name, plugin_dir))
    module = _import(dir_name, plugin_file)
    cls = find_plugin_class(module)
    if cls is None:
        raise PluginLoadError(f"{plugin_file} defines no Plugin subclass (expected class QanotPlugin)")
    try:
        plugin = cls()
    except Exception as exc:
        raise PluginLoadError(f"{getattr(cls, '__name__', repr(cls))}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(plugin, Plugin):
        raise PluginLoadError(f"QanotPlugin in {plugin_file} is {type(plugin).__name__}, not a Plugin subclass")
    return plugin


def _import(dir_name: str, plugin_file: str) -> types.ModuleType:
    module_name = "plugin_" + dir_name
    spec = importlib.util.spec_from_file_location(module_name, plugin_file)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"{plugin_file} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # Qanot leaves the module out of sys.modules, which breaks dataclasses defined in it; a plugin
    # that works there works here too. Relative imports resolve inside plugins.<dir>.
    module.__package__ = f"{PLUGINS_PACKAGE}.{dir_name}"
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise PluginLoadError(f"syntax error in {exc.filename} line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        raise PluginLoadError(f"importing {plugin_file} raised {type(exc).__name__}: {exc}") from exc
    return module


class OwnPackageFinder(importlib.abc.MetaPathFinder):
    """Answers `plugins` (an empty package) and `plugins.<dir>` (the plugin's directory, its
    __init__.py run on first import as Python would); every other `plugins.*` name is not found."""

    def __init__(self, dir_name: str, plugin_dir: str) -> None:
        self._own = f"{PLUGINS_PACKAGE}.{dir_name}"
        self._plugin_dir = plugin_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname == PLUGINS_PACKAGE:
            return importlib.machinery.ModuleSpec(fullname, _EmptyPackage(), is_package=True)
        if fullname == self._own:
            init = os.path.join(self._plugin_dir, "__init__.py")
            if os.path.isfile(init):
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[self._plugin_dir])
            spec = importlib.machinery.ModuleSpec(fullname, _EmptyPackage(), is_package=True)
            spec.submodule_search_locations = [self._plugin_dir]
            return spec
        if fullname.startswith(PLUGINS_PACKAGE + ".") and not fullname.startswith(self._own + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}: a plugin can import only itself "
                                      f"as {self._own}", name=fullname)
        return None


class _EmptyPackage(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        if module.__spec__.submodule_search_locations is None:
            module.__path__ = []


def find_plugin_class(module: types.ModuleType) -> type[Plugin] | None:
    """`QanotPlugin` if the module has one (whatever it is, as in Qanot), else the first Plugin
    subclass in dir(module) order, defined or imported there."""
    candidate = getattr(module, "QanotPlugin", None)
    if candidate is not None:
        return candidate
    for attr in dir(module):
        obj = getattr(module, attr, None)
        if isinstance(obj, type) and issubclass(obj, Plugin) and obj is not Plugin:
            return obj
    return None


def check_tools(tools: object, plugin: str) -> dict[str, ToolDef]:
    """get_tools() output, checked: a list of ToolDef with names and callable handlers. An item that
    is not one is left out alone, said in the log under the plugin's name (its other tools are
    served: attack pass 47 found one tool's list for parameters failing the whole plugin). A name
    given twice keeps the last one, as Qanot's registry does, with a warning."""
    if not isinstance(tools, (list, tuple)):
        raise TypeError(f"get_tools() returned {type(tools).__name__}, expected a list of ToolDef")
    by_name: dict[str, ToolDef] = {}
    problems = []
    for index, item in enumerate(tools):
        problem = _tool_problem(item, f"get_tools()[{index}]")
        if problem:
            problems.append(problem)
            continue
        if item.name in by_name:
            log.warning("plugin %s: get_tools() names tool %r twice; the later one (get_tools()[%d]) is kept",
                        plugin, item.name, index)
        by_name[item.name] = item
    if problems and not by_name:  # nothing usable at all: the plugin is broken, not one tool
        raise TypeError(problems[0])
    for problem in problems:
        log.error("plugin %s: %s; that tool is left out, the others are served", plugin, problem)
    return by_name


def _tool_problem(item: object, where: str) -> str:
    if not isinstance(item, ToolDef):
        return f"{where} is {type(item).__name__}, expected ToolDef"
    if not isinstance(item.name, str):
        return f"{where}: its name is {type(item.name).__name__}, not text"
    if not item.name:
        return f"{where} has no name"
    name = repr(item.name[:100])
    if not item.name.isascii() and not _encodable(item.name):
        return f"{where} ({name}): its name cannot be sent (a lone surrogate in it)"
    if not isinstance(item.parameters, dict):
        return f"{where} ({name}): parameters must be a dict, not {type(item.parameters).__name__}"
    if not callable(item.handler):
        return f"{where} ({name}): handler is not callable"
    return ""


def _encodable(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False
