"""Whether the filesystems that hold the plugins' places in the workspace grew since the last look.

A place in the workspace is walked when its plugin has run since its last walk, which the limits watch
learns by reading every plugin's cgroup CPU time at every look: 500 reads a second at 500 plugins, half
the host's idle CPU (side by side, 2026-11-27: 1.88% of a core with them, 0.83% without). No place can
grow unless its filesystem's used blocks or inodes do, and one statfs a filesystem (under 1 us here)
says whether they did: where neither grew since the last look, the watch reads a plugin's CPU only at
its turn in a rotation (limits_watch.QUIET_TURN), not at every look; and a place whose filesystem has
not grown at any look since the place was last walked is not walked again (for QUIET_WALK_MAX), though
its plugin ran: answering pings, 500 idle plugins had a walk each a minute, 8 walks a second.

What it cannot see, and what bounds it: the count is net, so space freed on the same filesystem in the
same interval (another process's deletion, a plugin's own files removed) hides as much written, once,
up to what was freed; the next look at which the filesystem grows reads every plugin's CPU, and a
plugin's CPU counts from its last walk, so what it wrote is found then; what can be hidden so is bounded
by what can be freed, not by time. Entries that take no space (hard links on ext4, until their directory
needs another block) likewise.
"""

from __future__ import annotations

import os

__all__ = ["DiskGrowth"]


class DiskGrowth:
    def __init__(self) -> None:
        self._device_of: dict[str, int] = {}  # a place -> the device it is on
        self._place_on: dict[int, str] = {}  # a device -> one place on it, to statfs
        self._used: dict[int, tuple[int, int]] = {}  # a device -> (used blocks, used inodes) at the last look
        self._grew: set[int] = set()
        self._generation: dict[int, int] = {}  # a device -> how many looks found it grown

    def look(self) -> None:
        """At each look's start: one statfs a filesystem (not a place: a few, however many plugins)."""
        grew = set()
        for device, place in list(self._place_on.items()):
            try:
                fs = os.statvfs(place)
            except OSError:  # that place is gone: the device is found again through the others
                self._forget(device)
                continue
            used = (fs.f_blocks - fs.f_bfree, fs.f_files - fs.f_ffree)
            last = self._used.get(device)
            self._used[device] = used
            if last is None or used[0] > last[0] or used[1] > last[1]:
                grew.add(device)
                self._generation[device] = self._generation.get(device, 0) + 1
        self._grew = grew

    def grew_anywhere(self) -> bool:
        """Whether any filesystem grew between the last two looks."""
        return bool(self._grew)

    def generation(self, place: str) -> int | None:
        """How many looks found the filesystem holding `place` grown (None: not watched): the same
        number at two moments means it did not grow, net, in any interval between them."""
        device = self._device_of.get(place)
        return self._generation.get(device) if device is not None and device in self._place_on else None

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
        self._generation.pop(device, None)
        for place in [p for p, d in self._device_of.items() if d == device]:
            del self._device_of[place]
