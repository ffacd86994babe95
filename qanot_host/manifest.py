"""plugin.json as the host reads it: a file the plugin's author wrote, so untrusted input.

It is opened without following a symlink in its last component, must be a regular file (a FIFO
would hang the host, a link to /dev/zero would fill its memory) and is read up to MAX_MANIFEST
bytes. The worker side has Qanot's own `PluginManifest` for plugins that read their manifest; the
host never imports that code.
"""

from __future__ import annotations

import errno
import os

import msgspec

from .json_objects import parse_json_object
from .safe_files import read_regular_file

__all__ = ["Manifest", "ManifestError", "read_manifest", "parse_version",
           "PERMISSIONS", "QANOT_API_VERSION", "MAX_MANIFEST"]

# The version of Qanot's plugin API the worker implements: plugin.json's min_qanot_version is
# compared with it.
QANOT_API_VERSION = "2.0.4"
# The names plugin.json's "permissions" may use (Qanot's list).
PERMISSIONS = ("network", "filesystem", "subprocess", "env_vars", "database")
MAX_MANIFEST = 1 << 20
MAX_SOURCE = 4 << 20  # a plugin.py the host reads (never runs) for `check`


class ManifestError(ValueError):
    """plugin.json exists but cannot be used; the message names the file and the key."""


class Manifest(msgspec.Struct, kw_only=True):
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
    # qanot-host's own key: true keeps the plugin's worker running (never started lazily, never
    # stopped when idle), for a plugin that holds state in memory or runs background tasks.
    keep_running: bool = False


def read_manifest(plugin_dir: str) -> tuple[Manifest, list[str]]:
    """The plugin's manifest (the default one if there is no plugin.json) and warnings, each naming
    the file and the key.

    Read as leniently as Qanot reads it where that loses nothing: a null is the default, a number
    where text belongs becomes text, a required_config, plugin_deps or permissions that is not a
    list is ignored, an unreadable min_qanot_version is ignored; each with a warning. A plugin.json
    that is not a JSON object, or whose `dependencies` is not a list, is a ManifestError: starting
    the plugin without its dependencies would end in an ImportError whose real cause nobody sees."""
    default_name = os.path.basename(os.path.normpath(plugin_dir))
    path = os.path.join(plugin_dir, "plugin.json")
    try:
        raw = read_regular_file(path, MAX_MANIFEST)
    except FileNotFoundError:
        return Manifest(name=default_name), []
    except OSError as exc:
        why = "is a symbolic link (plugin.json must be a file of its own)" if exc.errno == errno.ELOOP else \
            f"cannot be read: {exc.strerror or exc}"
        raise ManifestError(f"{path}: {why}") from None
    try:
        data = parse_json_object(raw, path)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    warnings: list[str] = []
    fields: dict[str, object] = {}
    for key in _TEXT_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            if isinstance(value, (dict, list)):
                warnings.append(f"{path}: {key}: expected text, got {_json_type(value)}; ignored")
                continue
            warnings.append(f"{path}: {key}: expected text, got {_json_type(value)}; read as {str(value)!r}")
        fields[key] = str(value)
    for key in _LIST_FIELDS:
        value = data.get(key, [])
        if not isinstance(value, list):
            if key == "dependencies":
                raise ManifestError(f"{path}: dependencies: expected a list of requirements, got {_json_type(value)}")
            warnings.append(f"{path}: {key}: expected a list, got {_json_type(value)}; ignored")
            continue
        items = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                if key == "dependencies" or isinstance(item, (dict, list)):
                    raise ManifestError(f"{path}: {key}[{index}]: expected text, got {_json_type(item)}")
                warnings.append(f"{path}: {key}[{index}]: expected text, got {_json_type(item)}; "
                                f"read as {str(item)!r}")
            items.append(str(item))
        fields[key] = items
    keep_running = data.get("keep_running", False)
    if isinstance(keep_running, bool):
        fields["keep_running"] = keep_running
    elif keep_running is not None:
        warnings.append(f"{path}: keep_running: expected true or false, got {_json_type(keep_running)}; ignored")
    manifest = Manifest(**fields)  # type: ignore[arg-type]
    if manifest.min_qanot_version:
        try:
            parse_version(manifest.min_qanot_version)
        except ValueError:
            warnings.append(f"{path}: min_qanot_version: not a version: {manifest.min_qanot_version!r}; ignored")
            manifest.min_qanot_version = ""
    if not manifest.name:
        manifest.name = default_name
    return manifest, warnings


_TEXT_FIELDS = {"name": "", "version": "0.1.0", "description": "", "author": "", "min_qanot_version": "",
                "homepage": "", "license": "MIT"}
_LIST_FIELDS = ("dependencies", "plugin_deps", "required_config", "permissions")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


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
