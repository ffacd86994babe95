"""Timeouts for many calls in flight, with one timer instead of one per call.

A timer per call costs a handle, a heap insert and a heap removal on every call, almost all of them
cancelled unfired. Calls with the same timeout expire in the order they were made, so one queue per
timeout value, checked from its head, finds every expired call in order; one timer, armed for the
earliest head, wakes the check. Entries of calls that already ended are dropped when they reach the
head, and a queue that grows well past the calls still in flight (behind one slow call, say) is
compacted, so memory follows what is in flight, not what was called.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Collection

__all__ = ["Deadlines"]

COMPACT_SLACK = 4096  # entries of ended calls tolerated per queue before it is rebuilt


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, live: Collection[int],
                 expire: Callable[[int, float, str], None]) -> None:
        """`live`: the ids still waiting (the channel's pending table); `expire(id, timeout, what)`
        is called for each one whose time is up."""
        self._loop = loop
        self._live = live
        self._expire = expire
        self._queues: dict[float, deque[tuple[float, int, str]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, request_id: int, timeout: float, what: str) -> None:
        deadline = self._loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        live = self._live
        # Calls mostly end in the order they were made: the head's is most often over already, and
        # dropping it here keeps the queue near the calls in flight without a rebuild.
        if queue and queue[0][1] not in live:
            queue.popleft()
        queue.append((deadline, request_id, what))
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        elif not request_id % COMPACT_SLACK and len(queue) > COMPACT_SLACK and len(queue) > 4 * len(live):
            self._queues[timeout] = deque(entry for entry in queue if entry[1] in live)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queues.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check)
        self._timer_at = when

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        live = self._live
        earliest = None
        for timeout, queue in list(self._queues.items()):
            while queue:
                deadline, request_id, what = queue[0]
                if request_id not in live:
                    queue.popleft()
                elif deadline <= now:
                    queue.popleft()
                    self._expire(request_id, timeout, what)
                else:
                    break
            if not queue:
                del self._queues[timeout]
            elif earliest is None or queue[0][0] < earliest:
                earliest = queue[0][0]
        if earliest is not None:
            self._arm(earliest)
