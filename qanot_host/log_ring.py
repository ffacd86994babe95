"""A plugin's recent output lines, kept by the host for `qanot-host logs PLUGIN [-f]`.

Bounded (the last LINES lines), and followable: a follower awaits `changed()`, which one future,
made only while someone waits, settles at the next line.
"""

from __future__ import annotations

import asyncio
import collections
import time

__all__ = ["LogRing", "LINES"]

LINES = 1000


class LogRing:
    def __init__(self, size: int = LINES) -> None:
        self.lines: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=size)
        self.total = 0  # lines ever appended: a follower's place survives the ring turning
        self._waiter: asyncio.Future | None = None

    def append(self, stream: str, text: str) -> None:
        self.lines.append((round(time.time(), 3), stream, text))
        self.total += 1
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def recent(self, count: int) -> list[tuple[float, str, str]]:
        return list(self.lines)[-count:] if count > 0 else []

    def since(self, seen: int) -> list[tuple[float, str, str]]:
        """The lines appended after the first `seen` (those still in the ring)."""
        new = self.total - max(seen, 0)
        return self.recent(min(new, len(self.lines)))

    async def changed(self) -> None:
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)
