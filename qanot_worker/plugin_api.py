"""Qanot's plugin API (`qanot.plugins.base`), reimplemented so Qanot plugins run here unedited.

Workers see this module as `qanot.plugins.base` through a small shim package that only the worker's
sys.path contains; the host imports it directly for `validate_tool_params` and `PluginManifest`. It must
stay free of host and worker internals, because plugin code imports it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec

__all__ = [
    "QANOT_API_VERSION", "Plugin", "ToolDef", "tool", "validate_tool_params", "PluginManifest",
    "ManifestError", "load_manifest", "parse_version",
]

# The version of Qanot's plugin API this package implements; plugin.json's min_qanot_version is
# compared with it.
QANOT_API_VERSION = "2.0.4"

DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

logger = logging.getLogger("qanot.plugins")

Handler = Callable[[dict], Awaitable[str]]


@dataclass
class ToolDef:
    """One agent-callable tool: what the LLM is shown, and the coroutine that answers it."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    handler: Handler | None = None


def tool(name: str, description: str, parameters: dict[str, Any] | None = None):
    """Mark a Plugin method as a tool; `Plugin._collect_tools()` finds it later."""

    def mark(func):
        func._qanot_tool = {
            "name": name,
            "description": description,
            "parameters": parameters if parameters is not None else dict(DEFAULT_PARAMETERS),
        }
        return func

    return mark


class Plugin:
    """Base class of every Qanot plugin. Subclasses override what they need."""

    name: str = ""
    description: str = ""
    version: str = "0.1.0"
    tools_md: str = ""
    soul_append: str = ""

    async def setup(self, config: dict) -> None:
        """Called once when the plugin loads, with its `config` dict from config.json."""

    async def teardown(self) -> None:
        """Called once at shutdown."""

    async def on_error(self, tool_name: str, error: Exception) -> None:
        """Called when one of this plugin's tools raises."""
        logger.error("Tool %s failed: %s", tool_name, error)

    def get_tools(self) -> list[ToolDef]:
        return self._collect_tools()

    def _collect_tools(self) -> list[ToolDef]:
        tools = []
        for attr in dir(type(self)):
            meta = getattr(getattr(type(self), attr, None), "_qanot_tool", None)
            if meta is not None:
                tools.append(ToolDef(handler=getattr(self, attr), **meta))
        return tools


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # bool is a subclass of int in Python, but JSON Schema keeps them apart.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, (list, tuple)),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def validate_tool_params(params: dict, schema: dict) -> list[str]:
    """Check required keys and basic JSON types; return one message per problem, none if valid."""
    if not isinstance(params, dict):
        return [f"Parameters must be an object, got {type(params).__name__}"]
    errors = [
        f"Missing required parameter: {key}"
        for key in schema.get("required", ()) if key not in params
    ]
    properties = schema.get("properties") or {}
    for key, value in params.items():
        expected = (properties.get(key) or {}).get("type")
        if expected is None:
            continue
        names = expected if isinstance(expected, list) else [expected]
        checks = [_JSON_TYPES[n] for n in names if n in _JSON_TYPES]
        if checks and not any(check(value) for check in checks):
            errors.append(
                f"Parameter '{key}' expected {' or '.join(names)}, got {type(value).__name__}"
            )
    return errors


def compile_validator(schema: dict) -> Callable[[dict], list[str]]:
    """validate_tool_params for one schema, with the schema's walk done once instead of per call.

    Valid params (the common case) cost a few dict lookups; invalid ones get the same messages as
    validate_tool_params, which produces them.
    """
    required = tuple(schema.get("required", ()))
    checks = []
    for key, prop in (schema.get("properties") or {}).items():
        expected = (prop or {}).get("type") if isinstance(prop, dict) else None
        names = expected if isinstance(expected, list) else [expected]
        tests = tuple(_JSON_TYPES[n] for n in names if n in _JSON_TYPES)
        if tests:
            checks.append((key, tests))

    def validate(params: dict) -> list[str]:
        if type(params) is not dict:
            return validate_tool_params(params, schema)
        for key in required:
            if key not in params:
                return validate_tool_params(params, schema)
        for key, tests in checks:
            if key in params:
                value = params[key]
                if not any(test(value) for test in tests):
                    return validate_tool_params(params, schema)
        return []

    return validate


class PluginManifest(msgspec.Struct, kw_only=True):
    """plugin.json, with the defaults Qanot gives a plugin that has none."""

    name: str = ""
    version: str = "0.1.0"
    description: str = ""
    author: str = ""
    dependencies: list[str] = []
    plugin_deps: list[str] = []
    required_config: list[str] = []
    min_qanot_version: str = ""
    homepage: str = ""
    license: str = "MIT"
    permissions: list[str] = []


# The names plugin.json's "permissions" may use (Qanot's list).
PERMISSIONS = ("network", "filesystem", "subprocess", "env_vars", "database")


class ManifestError(ValueError):
    """plugin.json exists but cannot be used; the message names the file and the key."""


def parse_version(text: str) -> tuple[int, ...]:
    """'2.0.0' -> (2, 0, 0); a pre-release or build suffix on the last part is ignored."""
    parts = []
    for piece in text.strip().lstrip("vV").split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            raise ValueError(f"not a version: {text!r}")
        parts.append(int(digits))
    return tuple(parts)


def load_manifest(plugin_dir: str, strict: bool = False) -> tuple[PluginManifest, list[str]]:
    """Read plugin_dir/plugin.json.

    Qanot falls back to a default manifest when the file is missing or broken; so do we, returning a
    warning that names the file. With strict=True a broken file raises ManifestError instead.
    """
    default_name = os.path.basename(os.path.normpath(plugin_dir))
    path = os.path.join(plugin_dir, "plugin.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return PluginManifest(name=default_name), []
    except OSError as exc:
        return _broken(path, f"cannot be read: {exc.strerror}", default_name, strict)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return _broken(path, f"is not valid JSON: {exc}", default_name, strict)
    if not isinstance(data, dict):
        return _broken(path, "must hold a JSON object", default_name, strict)
    try:
        manifest = msgspec.convert(data, PluginManifest)
    except msgspec.ValidationError as exc:
        return _broken(path, validation_message(exc), default_name, strict)
    if manifest.min_qanot_version:
        try:
            parse_version(manifest.min_qanot_version)
        except ValueError:
            return _broken(path, f"min_qanot_version: not a version: {manifest.min_qanot_version!r}",
                           default_name, strict)
    if not manifest.name:
        manifest.name = default_name
    return manifest, []


def validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec says 'Expected `array`, got `str` - at `$.dependencies`'; lead with the key instead.

    Also used by the host for config.json, so both files' errors read the same way.
    """
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    return f"{where.rstrip('`').removeprefix('$.')}: {message}"


def _broken(path: str, why: str, name: str, strict: bool) -> tuple[PluginManifest, list[str]]:
    message = f"{path}: {why}"
    if strict:
        raise ManifestError(message)
    return PluginManifest(name=name), [f"{message}; using the default manifest"]

