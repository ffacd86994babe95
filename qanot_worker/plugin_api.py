"""Qanot's plugin API (`qanot.plugins.base` of Qanot 2.0.4), written anew so that Qanot plugins run
here unedited: the same names, the same defaults, the same messages.

Workers see it as `qanot.plugins.base` through a shim package that only a worker's sys.path holds
(`_shim/qanot`). The host never imports it: it validates params and reads plugin.json with code of
its own. Where Qanot raises on a malformed schema (a list as a property's type), this does not.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from .protocol.messages import HOOK_NAMES

__all__ = ["QANOT_VERSION", "Plugin", "ToolDef", "tool", "validate_tool_params", "PluginManifest", "HOOKS",
           "EXTENSIONS", "overridden_hooks", "logger"]

# The Qanot release whose plugin API this is (plugin.json's min_qanot_version is compared with it).
QANOT_VERSION = "2.0.4"

logger = logging.getLogger("qanot.plugins.base")

# The hooks a plugin may override (Qanot's HookRegistry.register_plugin looks at these), and the
# extension points it may fill (read once, at load).
HOOKS = HOOK_NAMES  # the wire's names for them (protocol/messages.py), which the host checks Loaded.hooks by
EXTENSIONS = ("get_wal_patterns", "get_prompt_sections", "get_template_dir", "get_cron_jobs", "get_commands",
              "get_template_vars")


@dataclass
class ToolDef:
    """One agent-callable tool: what the LLM is shown, and the coroutine that answers it."""

    name: str
    description: str
    parameters: dict
    handler: Callable[[dict], Awaitable[str]]


@dataclass
class PluginManifest:
    """plugin.json. `permissions` is qanot-host's: what the plugin asks for (the operator grants)."""

    name: str
    version: str = "0.1.0"
    description: str = ""
    author: str = ""
    dependencies: list[str] = field(default_factory=list)
    plugin_deps: list[str] = field(default_factory=list)
    required_config: list[str] = field(default_factory=list)
    min_qanot_version: str = ""
    homepage: str = ""
    license: str = "MIT"
    permissions: list[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> "PluginManifest":
        """Read plugin.json; whatever cannot be used falls back to the defaults, with a warning."""
        path = Path(path)
        fallback = path.parent.name
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                logger.warning("plugin.json at %s is not a JSON object", path)
                return cls(name=fallback)
            texts: dict[str, Any] = {key: _text(raw.get(key), default) for key, default in (
                ("name", fallback), ("version", "0.1.0"), ("description", ""), ("author", ""),
                ("min_qanot_version", ""), ("homepage", ""), ("license", "MIT"))}
            lists: dict[str, Any] = {key: _names(raw.get(key, []), key, path) for key in (
                "dependencies", "plugin_deps", "required_config", "permissions")}
            return cls(**texts, **lists)
        except Exception as exc:
            logger.warning("Failed to parse plugin.json at %s: %s", path, exc)
            return cls(name=fallback)

    @classmethod
    def default(cls, name: str) -> "PluginManifest":
        return cls(name=name)


def _text(value: Any, default: str) -> str:
    return default if value is None else str(value)


def _names(value: Any, key: str, path: Path) -> list[str]:
    if not isinstance(value, list):
        logger.warning("plugin.json at %s: '%s' should be a list, got %s", path, key, type(value).__name__)
        return []
    return [str(item) for item in value]


def tool(name: str, description: str, parameters: dict | None = None):
    """Mark a method as a tool; `Plugin._collect_tools()` finds it."""

    def mark(func):
        func._tool_def = {"name": name, "description": description,
                          "parameters": parameters if parameters is not None else {"type": "object", "properties": {}}}
        return func

    return mark


class Plugin(ABC):
    """Base class of every Qanot plugin."""

    name: str = ""
    description: str = ""
    version: str = "0.1.0"
    tools_md: str = ""
    soul_append: str = ""

    async def setup(self, config: dict) -> None:
        """Called once when the plugin loads, with its `config` from config.json."""

    async def teardown(self) -> None:
        """Called once at shutdown."""

    @abstractmethod
    def get_tools(self) -> list[ToolDef]:
        """The plugin's tools; most plugins return self._collect_tools()."""

    async def on_error(self, tool_name: str, error: Exception) -> None:
        """Called when one of this plugin's tools raises (Qanot's own does nothing)."""

    def _collect_tools(self) -> list[ToolDef]:
        """Every callable attribute (methods, and instance attributes too) that @tool marked, in
        the order of dir(self): by attribute name."""
        tools = []
        for attr in dir(self):
            try:
                value = getattr(self, attr)
            except Exception:
                continue
            if callable(value) and hasattr(value, "_tool_def"):
                tools.append(ToolDef(**value._tool_def, handler=value))
        return tools

    # ---- extension points: read once at load --------------------------------------------------

    def get_wal_patterns(self) -> list[tuple[str, str, bool]]:
        return []

    def get_prompt_sections(self) -> list[dict]:
        return []

    def get_template_dir(self) -> str | None:
        return None

    def get_cron_jobs(self) -> list[dict]:
        return []

    def get_commands(self) -> list[dict]:
        return []

    def get_template_vars(self) -> dict[str, str]:
        return {}

    # ---- hooks: called by the agent ----------------------------------------------------------

    async def on_pre_turn(self, user_id: str, message: str) -> str | None:
        return None

    async def on_post_turn(self, user_id: str, message: str, response: str) -> str | None:
        return None

    async def on_tool_use(self, user_id: str, tool_name: str, tool_input: dict, result: str) -> None:
        return None

    async def on_startup(self) -> None:
        return None

    async def on_shutdown(self) -> None:
        return None

    async def on_compaction(self, user_id: str, before_tokens: int, after_tokens: int) -> None:
        return None


def overridden_hooks(plugin: Plugin) -> list[str]:
    """The hooks a plugin overrides, as Qanot's HookRegistry tells them apart: a bound method whose
    function is not Plugin's own."""
    found = []
    for name in HOOKS:
        method = getattr(plugin, name, None)
        function = getattr(method, "__func__", None)
        if function is not None and function is not getattr(Plugin, name):
            found.append(name)
    return found


_JSON_SCHEMA_TYPE_MAP: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
}


def _check_type(value: Any, expected: Any) -> bool:
    if isinstance(expected, list):  # Qanot raises here; a type may be a list of types in JSON Schema
        return not expected or any(value is None if one == "null" else _check_type(value, one) for one in expected)
    if not isinstance(expected, str):
        return True
    if isinstance(value, bool):
        return expected == "boolean" or expected not in _JSON_SCHEMA_TYPE_MAP
    kind = _JSON_SCHEMA_TYPE_MAP.get(expected)
    return kind is None or isinstance(value, kind)


def validate_tool_params(params: dict, schema: dict) -> list[str]:
    """Required keys and basic types, as Qanot checks them: one message per problem, none if valid.
    Extra keys, unknown types and nested schemas are not checked; a malformed schema never raises."""
    if not isinstance(params, dict):
        return [f"Parameters must be a dict, got {type(params).__name__}"]
    if not isinstance(schema, dict):
        return [f"Schema must be a dict, got {type(schema).__name__}"]
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        properties = {}
    required = schema.get("required", [])
    if not isinstance(required, list):
        required = []
    errors = [f"Missing required parameter: {key}" for key in required if isinstance(key, str) and key not in params]
    for key, value in params.items():
        prop = properties.get(key) if isinstance(key, str) else None
        if not isinstance(prop, dict):
            continue
        expected = prop.get("type")
        if expected and not _check_type(value, expected):
            names = " or ".join(expected) if isinstance(expected, list) else expected
            errors.append(f"Parameter '{key}' expected {names}, got {type(value).__name__}")
    return errors
