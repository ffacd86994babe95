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
import fcntl
import logging
import os
import re
import stat
import tempfile

__all__ = ["Workspace", "MAX_BLOCK"]

log = logging.getLogger("qanot_host.workspace")

LOCK_NAME = ".qanot-host.lock"
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
        async with self._lock:
            await asyncio.to_thread(self._update_locked, plugin, tools_md, soul_append)

    def _update_locked(self, plugin: str, tools_md: str, soul_append: str) -> None:
        if not tools_md.strip() and not soul_append.strip() and not os.path.isdir(self.directory):
            return
        os.makedirs(self.directory, exist_ok=True)
        # A plugin granted write on the workspace may have put symlinks where these files go: none
        # is ever followed (O_NOFOLLOW), and only regular files are read, up to MAX_FILE bytes.
        try:
            lock = os.open(os.path.join(self.directory, LOCK_NAME),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("plugin %s: TOOLS.md and SOUL.md not updated: %s/%s: %s", plugin, self.directory, LOCK_NAME,
                      exc.strerror)
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._put_block("TOOLS.md", plugin, _inert(plugin, "tools_md", tools_md))
            soul = _inert(plugin, "soul_append", soul_append)
            if soul and not _first_line_is_users(self._read("SOUL.md"), soul):
                self._put_block("SOUL.md", plugin, soul)
        except WorkspaceFileError as exc:
            log.error("plugin %s: %s", plugin, exc)
        finally:
            os.close(lock)

    def _put_block(self, filename: str, plugin: str, text: str) -> None:
        current = self._read(filename)
        block = f"{_BEGIN.format(plugin)}\n{text}\n{_END.format(plugin)}\n" if text else ""
        found = [m for m in _BLOCK.finditer(current) if m.group(1) == plugin]
        if found and found[0].group(0).rstrip("\n") == block.rstrip("\n") and len(found) == 1:
            return  # unchanged
        updated = current
        for match in reversed(found):
            updated = updated[:match.start()] + updated[match.end():]
        updated = _LEGACY.sub(lambda m: "" if m.group(1) == plugin else m.group(0), updated)
        if block:
            if updated and not updated.endswith("\n"):
                updated += "\n"
            if updated and not updated.endswith("\n\n"):
                updated += "\n"
            updated += block
        if updated != current:
            self._write(filename, updated)

    def _read(self, filename: str) -> str:
        path = os.path.join(self.directory, filename)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise WorkspaceFileError(f"{path} is left alone: {exc.strerror} (a symlink is never followed)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
                raise WorkspaceFileError(f"{path} is left alone: not a regular file of at most {MAX_FILE} bytes")
            return os.read(fd, MAX_FILE + 1).decode("utf-8", errors="replace")
        finally:
            os.close(fd)

    def _write(self, filename: str, text: str) -> None:
        path = os.path.join(self.directory, filename)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                mode = os.lstat(path).st_mode & 0o777
            except FileNotFoundError:
                mode = 0o644
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _inert(plugin: str, what: str, text: str) -> str:
    """The plugin's text as it goes into a block: no markers, no more than MAX_BLOCK bytes."""
    text = (text or "").strip().replace("<!--", "&lt;!--")
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
