"""Timeouts for many calls in flight, with one timer instead of one per call, and next to nothing
done per call.

A timer per call costs a handle, a heap insert and a heap removal on every call, almost all of them
cancelled unfired. Calls with the same timeout expire in the order they were made, so one queue per
timeout value, checked from its head, finds every expired call in order; one timer, armed for the
earliest head, wakes the check.

Even a queue entry per call showed: at 64 calls in flight, the host's CPU per call fell by a tenth
without it (measured 2026-11-27; the entry's tuple, its float and the pruning behind them). So the
calls of one loop turn that share a timeout share one entry, a batch: each call only appends its id
to the open batch, and the batch is sealed, its deadline taken, once the turn is over (by the
channel's own end-of-turn callback). The deadline is the seal's time plus the timeout: never early,
late only by what is left of the turn when a call is made (the loop's clock ticks in milliseconds
anyway). Batches whose calls all ended are dropped when they reach the head; a queue that grows well
past the calls still in flight (behind one slow call, say) is compacted, so memory follows what is
in flight, not what was called.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Collection

__all__ = ["Deadlines"]

log = logging.getLogger("qanot_host")

# A queue of more batches than this, and than twice the calls in flight, is rebuilt from the live ones:
# at least half of it goes, so each rebuild is paid for by the batches that made it necessary.
COMPACT_SLACK = 512


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, live: Collection[int],
                 expire: Callable[[int, float], None], sealed_by_owner: bool = False) -> None:
        """`live`: the ids still waiting (the channel's pending table); `expire(id, timeout)` is
        called for each one whose time is up. `sealed_by_owner`: the owner calls seal() at the end
        of every turn in which it added (the channel does, from the end-of-turn callback it has
        anyway: one callback a turn, not two); else a callback of its own does."""
        self._loop = loop
        self._sealed_by_owner = sealed_by_owner
        self._live = live
        self._expire = expire
        self.open_batches: dict[float, list[int]] = {}  # timeout -> the ids of this turn's calls, till seal()
        self._queues: dict[float, deque[tuple[float, list[int]]]] = {}  # timeout -> sealed batches
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, request_id: int, timeout: float) -> None:
        batch = self.open_batches.get(timeout)
        if batch is not None:
            batch.append(request_id)
            return
        if not self.open_batches and not self._sealed_by_owner:
            self._loop.call_soon(self.seal)
        self.open_batches[timeout] = [request_id]

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.open_batches.clear()
        self._queues.clear()

    def seal(self) -> None:
        """The turn is over: each open batch gets its deadline and joins its timeout's queue."""
        if not self.open_batches:
            return  # cleared meanwhile
        now = self._loop.time()
        live = self._live
        earliest = None
        for timeout, batch in self.open_batches.items():
            queue = self._queues.get(timeout)
            if queue is None:
                queue = self._queues[timeout] = deque()
            # calls mostly end in the order they were made: the head's are most often over already
            while queue and not any(request_id in live for request_id in queue[0][1]):
                queue.popleft()
            deadline = now + timeout
            queue.append((deadline, batch))
            if len(queue) > COMPACT_SLACK and len(queue) > 2 * len(live):
                self._queues[timeout] = self._compact(queue)
            if earliest is None or deadline < earliest:
                earliest = deadline
        self.open_batches.clear()
        if earliest is not None and (self._timer is None or earliest < self._timer_at):
            self._arm(earliest)

    def _compact(self, queue: deque[tuple[float, list[int]]]) -> deque[tuple[float, list[int]]]:
        live = self._live
        kept: deque[tuple[float, list[int]]] = deque()
        for deadline, batch in queue:
            waiting = [request_id for request_id in batch if request_id in live]
            if waiting:
                kept.append((deadline, waiting))
        return kept

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
                deadline, batch = queue[0]
                if deadline > now and any(request_id in live for request_id in batch):
                    break
                queue.popleft()
                if deadline <= now:
                    for request_id in batch:
                        if request_id in live:
                            try:
                                self._expire(request_id, timeout)
                            except Exception:  # one bad expiry must not leave the rest of its batch waiting
                                log.exception("expiring request %s failed", request_id)
            if not queue:
                if self._queues.get(timeout) is queue:  # an expiry may have cleared them all
                    del self._queues[timeout]
            elif earliest is None or queue[0][0] < earliest:
                earliest = queue[0][0]
        if earliest is not None:
            self._arm(earliest)
