"""Every worker's heartbeat from one timer: a worker silent for a whole ping_interval is pinged, and
one whose ping went unanswered for ping_timeout is killed (a blocked event loop cannot answer).

One task for the host, and a ping is one frame out and one back: no task, future or timer per worker
or per ping. Measured with 500 idle workers (a ping each every 10 s), side by side: the host's idle
CPU was 2.5-2.8% of a core with a task and a request per worker, 1.1-1.3% with one task looking at
every worker at every tick. A tick looks only at the workers whose moment has come (a heap of when
each is next due: when it will have been silent for ping_interval, or when its ping times out), so
a worker is looked at about twice per ping_interval, not at every tick: a look cost 2.5-6 us here, so
500 workers at every 1 s tick took 1.2-3 ms a second of the host's idle time for nothing. The price
is precision: a ping goes out, and an unanswered one is judged, up to a tick late (a quarter of the
shorter of ping_interval and ping_timeout, at most a second).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import WorkerHandle

__all__ = ["Heartbeats"]

MAX_TICK = 1.0
MIN_TICK = 0.01
TICKS_PER_PERIOD = 4


class Heartbeats:
    def __init__(self) -> None:
        self._workers: set[WorkerHandle] = set()
        # one entry a watched worker: (when it is next looked at, a tie-break, the worker); discard()
        # takes a worker's out at once
        self._due: list[tuple[float, int, WorkerHandle]] = []
        self._order = itertools.count()
        self._task: asyncio.Task | None = None
        self._tick = MAX_TICK

    def add(self, worker: WorkerHandle, interval: float, timeout: float) -> None:
        """Watch `worker` from now on (until beat() says it is gone, or discard()): first looked at
        by the next tick."""
        loop = asyncio.get_running_loop()
        if worker not in self._workers:
            self._workers.add(worker)
            heapq.heappush(self._due, (loop.time(), next(self._order), worker))
        self._tick = min(self._tick, max(MIN_TICK, min(MAX_TICK, min(interval, timeout) / TICKS_PER_PERIOD)))
        if self._task is None:
            self._task = loop.create_task(self._run())

    def discard(self, worker: WorkerHandle) -> None:
        """Its entry leaves the heap now: left until its moment, it held the gone worker (and all it
        offered) for up to a ping_interval, and restarts piled them up (attack pass 53)."""
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        if not self._workers and self._task is not None:
            self._task.cancel()
            self._task = None
            self._due.clear()
            return
        self._due[:] = [entry for entry in self._due if entry[2] is not worker]  # the list _run holds
        heapq.heapify(self._due)

    def __len__(self) -> int:
        return len(self._workers)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._tick)
            if not self._look(loop.time()):
                return

    def _look(self, now: float) -> bool:
        """One tick: each worker whose moment has come. False once nothing is left to watch (the
        task ends). A method of its own, so that no gone worker stays held by a local while the
        loop sleeps."""
        due = self._due
        while due and due[0][0] <= now:
            _, order, worker = heapq.heappop(due)
            next_look = worker.beat(now)
            if next_look is None:
                self.discard(worker)
                if self._task is None:
                    return False
            else:
                heapq.heappush(due, (next_look, order, worker))
        return True
