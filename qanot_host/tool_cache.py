"""What each plugin's last worker offered (its tools, its docs, its extension points), kept on disk
so a lazy plugin's tools are registered at the host's start without starting its worker.

An entry is valid only under the key it was written with: the plugin's directory content, its
config entry (and a digest of what its secrets resolve to) and host settings (and a digest of what
its granted env_vars hold), its dependency environment, the Python and the protocol. Any change to
one of them and the plugin is started once to list its tools again. An offer of no tools is never
kept. The files are the host's own (STATE_DIR/tool-cache, mode 0700), written whole and renamed
into place.
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
from .plugin_secrets import secrets_digest
from .safe_files import read_regular_file
from .settings import PluginEntry, PluginSettings

__all__ = ["ToolCache", "CachedOffer", "offer_key"]

log = logging.getLogger("qanot_host")

# The most a cache file may weigh (256 tools of 64 KiB schemas, and their docs, come to ~17 MB): a
# larger one is not read, and the plugin lists its tools anew.
MAX_CACHE_FILE = 32 * 2**20


class CachedOffer(msgspec.Struct):
    key: str
    info: p.Loaded
    tools: list[OfferedTool]
    extensions: p.Extensions


def offer_key(fingerprint: str, entry: PluginEntry, settings: PluginSettings, site_dirs: list[str]) -> str:
    material = msgspec.json.encode([p.PROTOCOL_VERSION, sys.version, fingerprint, entry.config,
                                    secrets_digest(entry.config), settings, site_dirs,
                                    _granted_env_digest(settings)])
    return hashlib.sha256(material).hexdigest()


def _granted_env_digest(settings: PluginSettings) -> str:
    """What the plugin's granted env_vars hold now, as a digest (never the values): its tools may
    depend on them as on its secrets (attack pass 44: a tool named after one kept its old name from
    the cache after the variable changed)."""
    return hashlib.sha256(msgspec.json.encode(settings.permissions.environment())).hexdigest()


class ToolCache:
    def __init__(self, state_dir: str) -> None:
        self._dir = os.path.join(state_dir, "tool-cache")

    def _path(self, plugin: str) -> str:
        return os.path.join(self._dir, f"{plugin}.msgpack")

    def load(self, plugin: str, key: str) -> CachedOffer | None:
        """The plugin's cached offer if it was written under `key`; None otherwise (or unreadable)."""
        try:  # no symlink, nothing but a regular file (a FIFO put there held the host's loop: attack pass 69)
            cached = msgspec.msgpack.decode(read_regular_file(self._path(plugin), MAX_CACHE_FILE), type=CachedOffer)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("plugin %s: its cached tool list is unusable (%s); starting it to list its tools", plugin, why)
            return None
        # No tools is no offer to keep: most likely a failed login or a service down at its listing,
        # and with no tool registered, no call would ever start it to list them again.
        return cached if cached.key == key and cached.tools else None

    def forget(self, plugin: str) -> None:
        """The operator restarts the plugin: its next start lists its tools, whatever the cache says."""
        try:
            os.unlink(self._path(plugin))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("plugin %s: its cached tool list could not be removed: %s", plugin, exc.strerror or exc)

    def store(self, plugin: str, offer: CachedOffer) -> None:
        if not offer.tools:  # see load(); an older list is not kept either
            self.forget(plugin)
            return
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            fd, scratch = tempfile.mkstemp(prefix=".offer.", dir=self._dir)
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.msgpack.encode(offer))
            os.replace(scratch, self._path(plugin))
        except OSError as exc:  # the plugin runs on; its next lazy start lists its tools again
            log.warning("plugin %s: its tool list could not be cached: %s", plugin, exc.strerror or exc)
