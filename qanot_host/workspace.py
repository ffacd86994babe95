"""Appends plugins' tools_md to TOOLS.md and soul_append to SOUL.md, as Qanot does, safely.

Only the host writes these files (never a worker), one writer at a time: an asyncio lock inside this
host and an flock on a lock file against other hosts sharing the workspace. Each write goes to a
temporary file that replaces the old one, so a reader never sees a torn file.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile

__all__ = ["Workspace", "tools_marker"]

LOCK_NAME = ".qanot-host.lock"


def tools_marker(plugin: str) -> str:
    """The line that says a plugin's tools_md is already in TOOLS.md (Qanot checks by plugin name)."""
    return f"<!-- plugin: {plugin} -->"


class Workspace:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = asyncio.Lock()

    async def add_plugin_docs(self, plugin: str, tools_md: str, soul_append: str) -> None:
        if not tools_md.strip() and not soul_append.strip():
            return
        async with self._lock:
            await asyncio.to_thread(self._add_locked, plugin, tools_md, soul_append)

    def _add_locked(self, plugin: str, tools_md: str, soul_append: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, LOCK_NAME), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if tools_md.strip():
                marker = tools_marker(plugin)
                self._append_once("TOOLS.md", marker, f"{marker}\n{tools_md.strip()}\n")
            if soul_append.strip():
                # Qanot's rule: the first line of soul_append is its de-duplication marker.
                first_line = soul_append.strip().splitlines()[0]
                self._append_once("SOUL.md", first_line, soul_append.strip() + "\n")

    def _append_once(self, filename: str, marker: str, block: str) -> None:
        path = os.path.join(self.directory, filename)
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if any(line.strip() == marker.strip() for line in current.splitlines()):
            return
        separator = "" if not current or current.endswith("\n\n") else ("\n" if current.endswith("\n") else "\n\n")
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(current + separator + block)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(path):
                os.chmod(tmp, os.stat(path).st_mode & 0o777)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
