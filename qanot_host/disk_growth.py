"""Whether the filesystems that hold the plugins' places in the workspace grew since the last look.

A place in the workspace is walked when its plugin has run since its last walk, which the limits watch
learns by reading every plugin's cgroup CPU time at every look: 500 reads a second at 500 plugins, half
the host's idle CPU (side by side, 2026-11-27: 1.88% of a core with them, 0.83% without). No place can
grow unless its filesystem's used blocks or inodes do, and one statfs a filesystem (under 1 us here)
says whether they did: where neither grew since the last look, the watch reads a plugin's CPU only at
its turn in a rotation (limits_watch.QUIET_TURN), not at every look; and a place is not walked again
(for limits_watch.QUIET_WALK_MAX) until its filesystem holds SLACK_BYTES or SLACK_INODES more than at
its last walk, though its plugin ran: answering pings, 500 idle plugins had a walk each a minute, 8
walks a second; and this machine's own writes grow its disk by a block every half minute or so.

What it cannot see, and what bounds it: the count is net, so space freed on the same filesystem in the
same interval (another process's deletion, a plugin's own files removed) hides as much written, once,
up to what was freed; the next look at which the filesystem grows reads every plugin's CPU, and a
plugin's CPU counts from its last walk, so what it wrote is found then; what can be hidden so is bounded
by what can be freed (and the slack), not by time. Entries that take no space (hard links on ext4, until
their directory needs another block) likewise.
"""

from __future__ import annotations

import os

__all__ = ["DiskGrowth", "SLACK_BYTES", "SLACK_INODES"]

SLACK_BYTES = 1 << 20
SLACK_INODES = 64


class DiskGrowth:
    def __init__(self) -> None:
        self._device_of: dict[str, int] = {}  # a place -> the device it is on
        self._place_on: dict[int, str] = {}  # a device -> one place on it, to statfs
        self._used: dict[int, tuple[int, int]] = {}  # a device -> (bytes, inodes) in use at the last look
        self._grew: set[int] = set()

    def look(self) -> None:
        """At each look's start: one statfs a filesystem (not a place: a few, however many plugins)."""
        grew = set()
        for device, place in list(self._place_on.items()):
            try:
                fs = os.statvfs(place)
            except OSError:  # that place is gone: the device is found again through the others
                self._forget(device)
                continue
            used = ((fs.f_blocks - fs.f_bfree) * fs.f_frsize, fs.f_files - fs.f_ffree)
            last = self._used.get(device)
            self._used[device] = used
            if last is None or used[0] > last[0] or used[1] > last[1]:
                grew.add(device)
        self._grew = grew

    def grew_anywhere(self) -> bool:
        """Whether any filesystem grew between the last two looks."""
        return bool(self._grew)

    def in_use(self, place: str) -> tuple[int, int] | None:
        """(bytes, inodes) in use on the filesystem holding `place` at the last look (None: not
        watched yet)."""
        device = self._device_of.get(place)
        return self._used.get(device) if device is not None else None

    @staticmethod
    def grown_by_slack(now: tuple[int, int], then: tuple[int, int]) -> bool:
        return now[0] - then[0] >= SLACK_BYTES or now[1] - then[1] >= SLACK_INODES

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
            self._place_on.setdefault(device, place)
            return True
        return device in self._grew or device not in self._place_on

    def _forget(self, device: int) -> None:
        self._place_on.pop(device, None)
        self._used.pop(device, None)
        for place in [p for p, d in self._device_of.items() if d == device]:
            del self._device_of[place]
