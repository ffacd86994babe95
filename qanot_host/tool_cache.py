"""What each plugin's last worker offered (its tools, its docs, its extension points), kept on disk
so a lazy plugin's tools are registered at the host's start without starting its worker.

An entry is valid only under the key it was written with: the plugin's directory content, its
config entry and host settings, its dependency environment, the Python and the protocol. Any change
to one of them and the plugin is started once to list its tools again. The files are the host's
own (STATE_DIR/tool-cache, mode 0700), written whole and renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile

import msgspec

from qanot_worker import protocol as p

from .offered import OfferedTool
from .settings import PluginEntry, PluginSettings

__all__ = ["ToolCache", "CachedOffer", "offer_key"]

log = logging.getLogger("qanot_host")


class CachedOffer(msgspec.Struct):
    key: str
    info: p.Loaded
    tools: list[OfferedTool]
    extensions: p.Extensions


def offer_key(fingerprint: str, entry: PluginEntry, settings: PluginSettings, site_dirs: list[str]) -> str:
    material = msgspec.json.encode([p.PROTOCOL_VERSION, sys.version, fingerprint, entry.config, settings, site_dirs])
    return hashlib.sha256(material).hexdigest()


class ToolCache:
    def __init__(self, state_dir: str) -> None:
        self._dir = os.path.join(state_dir, "tool-cache")

    def _path(self, plugin: str) -> str:
        return os.path.join(self._dir, f"{plugin}.msgpack")

    def load(self, plugin: str, key: str) -> CachedOffer | None:
        """The plugin's cached offer if it was written under `key`; None otherwise (or unreadable)."""
        try:
            with open(self._path(plugin), "rb") as f:
                cached = msgspec.msgpack.decode(f.read(), type=CachedOffer)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            log.warning("plugin %s: its cached tool list is unusable (%s); starting it to list its tools", plugin, exc)
            return None
        return cached if cached.key == key else None

    def store(self, plugin: str, offer: CachedOffer) -> None:
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            fd, scratch = tempfile.mkstemp(prefix=".offer.", dir=self._dir)
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.msgpack.encode(offer))
            os.replace(scratch, self._path(plugin))
        except OSError as exc:  # the plugin runs on; its next lazy start lists its tools again
            log.warning("plugin %s: its tool list could not be cached: %s", plugin, exc.strerror or exc)
