"""plugin.json as the host reads it: a file the plugin's author wrote, so untrusted input.

It is opened without following a symlink in its last component, must be a regular file (a FIFO
would hang the host, a link to /dev/zero would fill its memory) and is read up to MAX_MANIFEST
bytes. The worker side has Qanot's own `PluginManifest` for plugins that read their manifest; the
host never imports that code.
"""

from __future__ import annotations

import json
import os
import stat

import msgspec

__all__ = ["Manifest", "ManifestError", "read_manifest", "read_plugin_file", "parse_version",
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


def read_plugin_file(path: str, limit: int) -> bytes:
    """A file of a plugin's, safely: no symlink at the end, regular, at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > limit:
            raise OSError(0, f"{st.st_size} bytes, over the {limit} read")
        return os.read(fd, limit + 1)[:limit]
    finally:
        os.close(fd)


def read_manifest(plugin_dir: str) -> Manifest:
    """The plugin's manifest: the default one if there is no plugin.json; ManifestError (naming the
    file and the key) if there is one that cannot be used."""
    default_name = os.path.basename(os.path.normpath(plugin_dir))
    path = os.path.join(plugin_dir, "plugin.json")
    try:
        raw = read_plugin_file(path, MAX_MANIFEST)
    except FileNotFoundError:
        return Manifest(name=default_name)
    except OSError as exc:
        why = "is a symbolic link (plugin.json must be a file of its own)" if exc.errno == 40 else \
            f"cannot be read: {exc.strerror or exc}"
        raise ManifestError(f"{path}: {why}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{path}: is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{path}: is nested too deeply") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: must hold a JSON object")
    try:
        manifest = msgspec.convert(data, Manifest)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, sep, where = text.rpartition(" - at `")
        raise ManifestError(f"{path}: {where.rstrip('`').removeprefix('$.')}: {message}" if sep else
                            f"{path}: {text}") from None
    if manifest.min_qanot_version:
        try:
            parse_version(manifest.min_qanot_version)
        except ValueError:
            raise ManifestError(f"{path}: min_qanot_version: not a version: {manifest.min_qanot_version!r}") from None
    if not manifest.name:
        manifest.name = default_name
    return manifest


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
