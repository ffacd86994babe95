"""A uid of its own for each plugin, the same at every start, never shared by two plugins.

A hash of the name alone collides (50 plugins in 4000 uids collide one time in four), and two
plugins on one uid could reach each other's files through a directory granted to both. So each
plugin gets the uid its name hashes to unless that is taken, then the next free one, and the choice
is kept in STATE_DIR/uids.json (written whole, under a lock, by the host only).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import tempfile
import zlib
from typing import Iterable

__all__ = ["UidMap", "UID_RANGE", "writable_by", "used_elsewhere"]

UID_RANGE = 4000


class UidMap:
    def __init__(self, state_dir: str, base: int) -> None:
        self._path = os.path.join(state_dir, "uids.json")
        self._base = base
        self._cache: dict[str, int] = {}

    def uid(self, plugin: str) -> int:
        uid = self._cache.get(plugin)
        if uid is None:
            self.reserve([plugin])
            uid = self._cache[plugin]
        return uid

    def reserve(self, plugins: Iterable[str]) -> None:
        """Give each of `plugins` its uid now: one read and at most one write of the table for all
        of them (a host starting 500 plugins on a fresh state_dir rewrote it 500 times, 0.5 s of
        its CPU). OSError if the table cannot be written or no uid is left."""
        wanted = [plugin for plugin in plugins if plugin not in self._cache]
        if wanted:
            self._cache.update(self._allocate(wanted))

    def problem(self) -> str:
        """Why this table is not this uid_base's, "" when it is (for `check`, and each start)."""
        return self._foreign(self._read())

    def _foreign(self, table: dict[str, int]) -> str:
        """A table whose uids come from another uid_base: a host of this state_dir ran with another
        (QANOT_HOST_UID_BASE left out of one shell): each plugin was given a uid anew and its data
        directory chowned to it, and its workspace place refused (newcomer pass 58)."""
        other = next(((name, uid) for name, uid in table.items()
                      if isinstance(uid, int) and not self._valid(uid)), None)
        if other is None:
            return ""
        return (f"{self._path} was made with another uid_base (plugin {other[0]} has uid {other[1]}, outside "
                f"{self._base}..{self._base + UID_RANGE - 1}): run with the uid_base it was made with "
                "(host.sandbox.uid_base, or QANOT_HOST_UID_BASE), or remove the file to give the plugins new uids "
                "(then chown their data and workspace places to them)")

    def peek(self, plugin: str) -> int:
        """The uid the plugin has, or would get now, without writing anything (for `check`)."""
        table = self._read()
        uid = table.get(plugin)
        if uid is not None and self._valid(uid):
            return uid
        return self._first_free(plugin, {v for k, v in table.items() if k != plugin}) or -1

    def _allocate(self, plugins: list[str]) -> dict[str, int]:
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        with open(self._path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = self._read()
            foreign = self._foreign(table)
            if foreign:
                raise OSError(0, foreign)
            kept = {plugin: uid for plugin, uid in table.items() if self._valid(uid)}
            taken = set(kept.values())
            fresh = [plugin for plugin in dict.fromkeys(plugins) if plugin not in kept]
            for plugin in fresh:
                uid = self._first_free(plugin, taken)
                if uid is None:
                    raise OSError(0, f"all {UID_RANGE} plugin uids from {self._base} are taken ({self._path})")
                table[plugin] = kept[plugin] = uid
                taken.add(uid)
            if fresh:
                self._write(table)
            return {plugin: kept[plugin] for plugin in plugins}

    def _valid(self, uid: object) -> bool:
        return isinstance(uid, int) and self._base <= uid < self._base + UID_RANGE

    def _first_free(self, plugin: str, taken: set[int]) -> int | None:
        """The uid the plugin's name hashes to, else the next one no other plugin has."""
        start = zlib.crc32(plugin.encode()) % UID_RANGE
        return next((uid for uid in (self._base + (start + i) % UID_RANGE for i in range(UID_RANGE))
                     if uid not in taken and not _has_user(uid)), None)

    def _read(self) -> dict[str, int]:
        try:
            with open(self._path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, table: dict[str, int]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".uids.", dir=os.path.dirname(self._path))
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, self._path)


def used_elsewhere(uids: dict[int, str], ours: int) -> dict[str, tuple[int, int, str]]:
    """Of `uids` (uid -> plugin), those a process runs as that does not descend from process `ours`
    (the host): plugin -> (uid, pid, its name). The table is per state_dir, so another host with a
    state_dir of its own and the same uid_base gives same-named plugins the same uids. Reads every
    process's status: off the event loop."""
    found: dict[str, tuple[int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        name, parent, uid = _status(pid)
        plugin = uids.get(uid)
        if plugin is not None and plugin not in found and pid != ours and not _descends_from(parent, ours):
            found[plugin] = (uid, pid, name)
    return found


def _status(pid: int) -> tuple[str, int, int]:
    """A process's name, parent and real uid, from /proc/PID/status (("", 0, -1) if it is gone)."""
    name, ppid = "", 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key == b"Name":
                    name = value.strip().decode(errors="replace")
                elif key == b"PPid":
                    ppid = int(value)
                elif key == b"Uid":  # after Name and PPid
                    return name, ppid, int(value.split()[0])
    except (OSError, ValueError):
        pass
    return "", 0, -1


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        pid = _status(pid)[1]
        if pid <= 1:
            return False
    return False


def _has_user(uid: int) -> bool:
    """A user of the system's has this uid (as the system's name service knows it): not a plugin's."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def writable_by(path: str, uid: int) -> bool:
    """Would `uid` (not this process) be allowed to write in `path`? By its mode bits."""
    st = os.stat(path)
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & 0o200)
    if st.st_gid == uid:  # plugin uids have a group of the same number
        return bool(st.st_mode & 0o020)
    return bool(st.st_mode & 0o002)
