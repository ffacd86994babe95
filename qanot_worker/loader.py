"""Import one plugin the way Qanot's loader does, inside the worker.

The plugin directory becomes a package of its own (`qanot_plugin_<name>`), so both `import helpers`
(the directory is on sys.path, as in Qanot) and `from .helpers import x` work.
"""

from __future__ import annotations

import importlib.util
import site
import sys
import types

from .plugin_api import Plugin, ToolDef

__all__ = ["PluginLoadError", "load_plugin", "check_tools"]


class PluginLoadError(Exception):
    """The plugin could not be turned into an instance; the message says why."""


def load_plugin(name: str, plugin_file: str, plugin_dir: str, site_dirs: list[str]) -> Plugin:
    for site_dir in site_dirs:
        # addsitedir also runs the environment's .pth files, which is why the worker starts with -S.
        site.addsitedir(site_dir)
    if plugin_dir not in sys.path:
        sys.path.insert(0, plugin_dir)
    module = _import(name, plugin_file, plugin_dir)
    cls = find_plugin_class(module)
    if cls is None:
        raise PluginLoadError(f"{plugin_file} defines no Plugin subclass (expected class QanotPlugin)")
    try:
        plugin = cls()
    except Exception as exc:
        raise PluginLoadError(f"{cls.__name__}() raised {type(exc).__name__}: {exc}") from exc
    if not plugin.name:
        plugin.name = name
    return plugin


def _import(name: str, plugin_file: str, plugin_dir: str) -> types.ModuleType:
    package_name = "qanot_plugin_" + "".join(c if c.isalnum() else "_" for c in name)
    is_package_init = plugin_file.endswith("__init__.py")
    if is_package_init:
        module_name = package_name
        spec = importlib.util.spec_from_file_location(
            module_name, plugin_file, submodule_search_locations=[plugin_dir])
    else:
        package = types.ModuleType(package_name)
        package.__path__ = [plugin_dir]
        sys.modules[package_name] = package
        module_name = f"{package_name}.plugin"
        spec = importlib.util.spec_from_file_location(module_name, plugin_file)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"{plugin_file} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise PluginLoadError(f"syntax error in {exc.filename} line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        raise PluginLoadError(f"importing {plugin_file} raised {type(exc).__name__}: {exc}") from exc
    return module


def find_plugin_class(module: types.ModuleType) -> type[Plugin] | None:
    """`QanotPlugin` if the module has one, else the first Plugin subclass it defines or imports."""
    candidate = getattr(module, "QanotPlugin", None)
    if isinstance(candidate, type) and issubclass(candidate, Plugin):
        return candidate
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Plugin) and obj is not Plugin]
    own = [cls for cls in found if cls.__module__ == module.__name__]
    return (own or found or [None])[0]


def check_tools(tools: object) -> dict[str, ToolDef]:
    """get_tools() output, checked: a list of ToolDef with unique names and callable handlers."""
    if not isinstance(tools, (list, tuple)):
        raise TypeError(f"get_tools() returned {type(tools).__name__}, expected a list of ToolDef")
    by_name: dict[str, ToolDef] = {}
    for index, item in enumerate(tools):
        where = f"get_tools()[{index}]"
        if not isinstance(item, ToolDef):
            raise TypeError(f"{where} is {type(item).__name__}, expected ToolDef")
        if not isinstance(item.name, str) or not item.name:
            raise TypeError(f"{where} has no name")
        if not isinstance(item.parameters, dict):
            raise TypeError(f"{where} ({item.name}): parameters must be a dict")
        if not callable(item.handler):
            raise TypeError(f"{where} ({item.name}): handler is not callable")
        if item.name in by_name:
            raise TypeError(f"{where}: tool name {item.name!r} is used twice")
        by_name[item.name] = item
    return by_name
