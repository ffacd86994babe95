"""Puts plugins' tools_md into TOOLS.md and soul_append into SOUL.md, as the Qanot document says, in
blocks no plugin can forge or bloat.

Each plugin owns one block in each file::

    <!-- qanot-host:begin NAME -->
    ...its text...
    <!-- qanot-host:end NAME -->

A block is replaced when the plugin's text changes and left alone when it does not; it is never
appended twice. Plugin text cannot contain a marker: every "<!--" in it is written as "&lt;!--", so
a plugin cannot end its block early, open another's or hide another's behind a fake one. Each block
is capped at MAX_BLOCK bytes (the rest is cut, with a warning naming the plugin). What the user
wrote outside the blocks is kept as it was. SOUL.md keeps Qanot's rule too: a soul_append whose
first line is already in the user's text is not added.

Only the host writes these files (never a worker), one writer at a time: an asyncio lock inside this
host and an flock on a lock file against other hosts sharing the workspace. Each write goes to a
temporary file that replaces the old one, so a reader never sees a torn file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets

from .flock import flock_within
from .output import plain_text
from .safe_files import read_regular_file

__all__ = ["Workspace", "MAX_BLOCK"]

log = logging.getLogger("qanot_host.workspace")

LOCK_NAME = ".qanot-host.lock"
LOCK_TIMEOUT = 5.0  # another host editing the files holds the lock for milliseconds
FILE_MODE = 0o644
MAX_BLOCK = 64 * 1024
MAX_FILE = 16 * 1024 * 1024  # a TOOLS.md or SOUL.md larger than this is not edited
_BEGIN = "<!-- qanot-host:begin {} -->"
_END = "<!-- qanot-host:end {} -->"
_BLOCK = re.compile(r"^<!-- qanot-host:begin (.+?) -->\n.*?^<!-- qanot-host:end \1 -->\n?", re.M | re.S)
# The marker earlier qanot-host versions put before a plugin's tools_md (a block then ran to the next one)
_LEGACY = re.compile(r"^<!-- plugin: (.+?) -->\n(?:(?!<!-- plugin: |<!-- qanot-host:begin ).*\n?)*", re.M)


class WorkspaceFileError(OSError):
    """A workspace file the host will not touch (a symlink, not a regular file, too large)."""


class Workspace:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = asyncio.Lock()

    async def add_plugin_docs(self, plugin: str, tools_md: str, soul_append: str) -> None:
        """Never raises: a workspace the host cannot edit is logged, and the plugin runs on."""
        await self.add_plugins_docs([(plugin, tools_md, soul_append)])

    async def add_plugins_docs(self, docs: list[tuple[str, str, str]]) -> None:
        """(plugin, tools_md, soul_append) of plugins started together, in one read and at most one
        write of each file: one plugin at a time, a host of 2000 plugins with docs spent 10 s reading
        and rewriting a TOOLS.md that grew with each. Never raises, as add_plugin_docs."""
        if not docs:
            return
        async with self._lock:
            try:
                await asyncio.to_thread(self._update_locked, docs)
            except (OSError, WorkspaceFileError) as exc:
                names = ", ".join(plugin for plugin, _, _ in docs[:5]) + (", ..." if len(docs) > 5 else "")
                log.error("plugin%s %s: TOOLS.md and SOUL.md not updated: %s", "s" if len(docs) > 1 else "", names,
                          exc)

    def _update_locked(self, docs: list[tuple[str, str, str]]) -> None:
        if all(not tools_md.strip() and not soul.strip() for _, tools_md, soul in docs) \
                and not os.path.isdir(self.directory):
            return
        os.makedirs(self.directory, exist_ok=True)
        # Everything below is relative to the directory's descriptor, and no name in it is ever
        # followed if it is a symlink: whoever else writes there (another program, a plugin granted
        # it) cannot turn a write, a chmod or a read of the host's elsewhere.
        directory = os.open(self.directory, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            lock = os.open(LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=directory)
            try:
                _lock_within(lock, LOCK_TIMEOUT, os.path.join(self.directory, LOCK_NAME))
                self._put_blocks(directory, "TOOLS.md", {plugin: _inert(plugin, "tools_md", tools_md)
                                                         for plugin, tools_md, _ in docs})
                souls = {plugin: _inert(plugin, "soul_append", soul) for plugin, _, soul in docs}
                current = self._read(directory, "SOUL.md") if any(souls.values()) else ""
                self._put_blocks(directory, "SOUL.md", {plugin: soul for plugin, soul in souls.items()
                                                        if soul and not _first_line_is_users(current, soul)})
            finally:
                os.close(lock)
        finally:
            os.close(directory)

    def _put_blocks(self, directory: int, filename: str, texts: dict[str, str]) -> None:
        """Each plugin's block holds its text ("": no block), the rest of the file as it was."""
        if not texts:
            return
        current = self._read(directory, filename)
        found: dict[str, list[re.Match]] = {}
        for match in _BLOCK.finditer(current):
            found.setdefault(match.group(1), []).append(match)
        blocks = {plugin: f"{_BEGIN.format(plugin)}\n{text}\n{_END.format(plugin)}\n" if text else ""
                  for plugin, text in texts.items()}
        def unchanged(plugin: str, block: str) -> bool:
            there = found.get(plugin, [])
            return len(there) == 1 and there[0].group(0).rstrip("\n") == block.rstrip("\n")

        changing = {plugin: block for plugin, block in blocks.items() if not unchanged(plugin, block)}
        if not changing:
            return  # unchanged
        updated = current
        for start, end in sorted(((m.start(), m.end()) for plugin in changing for m in found.get(plugin, ())),
                                 reverse=True):
            updated = updated[:start] + updated[end:]
        updated = _LEGACY.sub(lambda m: "" if m.group(1) in changing else m.group(0), updated)
        for block in changing.values():
            if block:
                if updated and not updated.endswith("\n"):
                    updated += "\n"
                if updated and not updated.endswith("\n\n"):
                    updated += "\n"
                updated += block
        if updated != current:
            self._write(directory, filename, updated)

    def _read(self, directory: int, filename: str) -> str:
        path = os.path.join(self.directory, filename)
        try:
            return read_regular_file(filename, MAX_FILE, dir_fd=directory).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise WorkspaceFileError(f"{path} is left alone: {exc.strerror} (a symlink is never followed; "
                                     f"a regular file of at most {MAX_FILE} bytes is edited)") from None

    def _write(self, directory: int, filename: str, text: str) -> None:
        """A new file, made here (O_EXCL: never one someone put in the way), given mode 0644 through
        its descriptor, then renamed over the old one, all relative to the directory."""
        scratch = f".{filename}.{secrets.token_hex(8)}"
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), FILE_MODE)
                os.fsync(f.fileno())
            os.rename(scratch, filename, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(scratch, dir_fd=directory)
            except OSError:
                pass
            raise


def _lock_within(fd: int, timeout: float, path: str) -> None:
    if not flock_within(fd, timeout):
        raise WorkspaceFileError(f"{path} has been locked by someone else for over {timeout:g} s")


def _inert(plugin: str, what: str, text: str) -> str:
    """The plugin's text as it goes into a block: no markers, no control characters but newlines and
    tabs (no terminal escapes for whoever cats the file), no more than MAX_BLOCK bytes."""
    text = plain_text(text or "").strip().replace("<!--", "&lt;!--")
    data = text.encode("utf-8", errors="replace")
    if len(data) > MAX_BLOCK:
        log.warning("plugin %s: its %s is %d bytes; only the first %d go into the workspace", plugin, what,
                    len(data), MAX_BLOCK)
        text = data[:MAX_BLOCK].decode("utf-8", errors="ignore")
    return text


def _first_line_is_users(current: str, soul: str) -> bool:
    """Qanot's rule: the first line of soul_append marks it as present, if the user's own text
    (outside every plugin's block) already has it."""
    first = soul.splitlines()[0].strip()
    users = _BLOCK.sub("", current)
    return bool(first) and any(line.strip() == first for line in users.splitlines())
