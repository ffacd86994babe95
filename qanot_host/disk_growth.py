"""Whether the filesystems holding the plugins' places in the workspace grew, and by how much.

A place in the workspace is walked when its plugin has run since its last walk, which the limits watch
learnt by reading every plugin's cgroup CPU at every look: 500 reads a second at 500 plugins, half the
host's idle CPU (side by side, 2026-11-27: 1.88% of a core with them, 0.83% without); and as answering
pings is running, every idle plugin had a walk a minute (8 walks a second at 500). No place can grow
unless its filesystem's used bytes or inodes do, and one statfs a filesystem a look (under 1 us here)
says whether they did. So a place is not walked again, nor its plugin's CPU read, until its filesystem
has grown by SLACK_BYTES or SLACK_INODES since the place's last walk, summed over the looks at which it
grew (this machine's own writes grow its disk by a block every half minute or so), or until
limits_watch.QUIET_WALK_MAX has gone by; and where no filesystem grew since the last look, a plugin is
looked at only at its turn (limits_watch.QUIET_TURN).

What it cannot see, and what bounds it: between two looks the count is net, so space freed on the same
filesystem in the same interval (another process's deletion, a plugin's own files removed) hides as
much written, up to what was freed, until QUIET_WALK_MAX; entries that take no space (hard links on
ext4, until their directory needs another block) likewise. Only filesystems whose statfs counts a write
as it is made are trusted so (COUNTS_AT_ONCE); on any other the watch does as it did without this.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterable

__all__ = ["DiskGrowth", "SLACK_BYTES", "SLACK_INODES", "counts_at_once"]

SLACK_BYTES = 1 << 20
SLACK_INODES = 64
# Filesystems whose statfs counts a write when it is made (delayed allocations included: ext4's dirty
# clusters, XFS's reservations, tmpfs's pages). Any other (a network filesystem, FUSE, one that counts
# at writeback) is looked at as before: every plugin's CPU at every look, and a walk as it ran.
COUNTS_AT_ONCE = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x01021994: "tmpfs"}
_statfs = ctypes.CDLL(None, use_errno=True).statfs


def counts_at_once(path: str) -> bool:
    """Whether the filesystem holding `path` is one of COUNTS_AT_ONCE (statfs's f_type, the struct's
    first field, a long on Linux), and counts both blocks and inodes: a tmpfs mounted with size=0 or
    nr_inodes=0 counts nothing of that kind (the review of 11-27)."""
    buffer = ctypes.create_string_buffer(256)
    if _statfs(os.fsencode(path), buffer) != 0:
        return False
    if (ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF) not in COUNTS_AT_ONCE:
        return False
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    return fs.f_blocks > 0 and fs.f_files > 0


class DiskGrowth:
    def __init__(self) -> None:
        self._device_of: dict[str, int] = {}  # a place -> the device it is on
        self._place_on: dict[int, str] = {}  # a device -> one place on it, to statfs
        self._used: dict[int, tuple[int, int]] = {}  # a device -> (bytes, inodes) in use at the last look
        # a device -> (bytes, inodes) it grew by, summed over the looks at which it grew: what is freed
        # takes nothing off (another test's files deleted beside a plugin's 60 MB hid them until
        # QUIET_WALK_MAX, in CI): only a free and a write in the same interval cancel out
        self._grown: dict[int, tuple[int, int]] = {}
        self._grew: set[int] = set()
        self._uncounted: set[int] = set()  # devices whose filesystem is not one of COUNTS_AT_ONCE
        self._fresh: set[str] = set()  # places first watched at this look

    def look(self) -> None:
        """At each look's start: one statfs a filesystem (not a place: a few, however many plugins)."""
        grew = set()
        self._fresh.clear()
        for device, place in list(self._place_on.items()):
            last = self._used.get(device)
            used = self._read(device, place)
            if used is not None and (last is None or used[0] > last[0] or used[1] > last[1]):
                grew.add(device)
        self._grew = grew

    def _read(self, device: int, place: str) -> tuple[int, int] | None:
        try:
            fs = os.statvfs(place)
        except OSError:  # that place is gone: the device is found again through the others
            self._forget(device)
            return None
        last = self._used.get(device)
        used = self._used[device] = ((fs.f_blocks - fs.f_bfree) * fs.f_frsize, fs.f_files - fs.f_ffree)
        grown = self._grown.get(device, (0, 0))
        if last is not None:
            grown = (grown[0] + max(0, used[0] - last[0]), grown[1] + max(0, used[1] - last[1]))
        self._grown[device] = grown
        return used

    def grew_anywhere(self) -> bool:
        """Whether any filesystem grew between the last two looks (one whose statfs is not trusted
        for that: always)."""
        return bool(self._grew) or bool(self._uncounted)

    def grown(self, place: str) -> tuple[int, int] | None:
        """(bytes, inodes) the filesystem holding `place` grew by, summed over the looks at which it
        grew, up to the last look (None: not watched yet)."""
        device = self._device_of.get(place)
        return self._grown.get(device) if device is not None and device not in self._uncounted else None

    @staticmethod
    def grown_by_slack(now: tuple[int, int], then: tuple[int, int]) -> bool:
        return now[0] - then[0] >= SLACK_BYTES or now[1] - then[1] >= SLACK_INODES

    def watch(self, places: Iterable[str]) -> bool:
        """Watch these places' filesystems from the next look on; True if any place was new."""
        new = [place for place in places if place not in self._device_of]
        for place in new:
            self.may_have_grown(place)
        self._fresh.update(new)  # and may have grown, at this look
        return bool(new)

    def may_have_grown(self, place: str) -> bool:
        """False only when the filesystem holding `place` was seen at the last two looks and its used
        blocks and inodes did not grow between them. A place not seen before: True, and it is
        watched from the next look on."""
        device = self._device_of.get(place)
        if device is None:
            try:
                device = os.stat(place, follow_symlinks=False).st_dev
            except OSError:
                return True
            self._device_of[place] = device
            if device not in self._place_on and device not in self._uncounted:
                if counts_at_once(place):
                    self._place_on[device] = place
                    self._read(device, place)  # its use known from now: a walk before the next look
                else:  # has its baseline
                    self._uncounted.add(device)
            return True
        return device in self._grew or device not in self._place_on or place in self._fresh

    def _forget(self, device: int) -> None:
        self._place_on.pop(device, None)
        self._used.pop(device, None)
        self._grown.pop(device, None)
        for place in [p for p, d in self._device_of.items() if d == device]:
            del self._device_of[place]
