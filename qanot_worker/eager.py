"""Eager calls for Python 3.11: a call's first step runs as soon as the call is read.

Most handlers finish without ever waiting (an echo, a computation, a cache hit). Run inside a new
Task each, such a call costs a Task (about 1 µs here), a trip through the loop's ready queue, and
its reply goes out one loop turn later, alone. Run at once, in the transport callback that read
it, its reply is ready before the next frame is looked at, and the replies to all the calls in
one read can leave in one write. Python 3.12 has eager tasks for this (`Task(eager_start=True)`),
used there; 3.11 does not, and gets what follows, built on asyncio's private `_enter_task` and
`_leave_task` (tests/test_exports.py runs it under every Python installed).

The first step must still run inside a real Task: `asyncio.timeout()`, aiohttp and anyio take
`current_task()` and cancel it later. So a dormant Task, the carrier, lends its name: it is the
current task while a first step runs, in a fresh context of the call's own. A call that finishes
in that step leaves the carrier free for the next. A call that stops to wait is adopted by that
same carrier, which then drives it to the end (in the call's context), so whatever took
`current_task()` during the first step holds the Task that runs the rest; a new carrier is made for
the calls after it.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from asyncio.tasks import _enter_task, _leave_task
from typing import Any, Coroutine

__all__ = ["EagerStarter", "NATIVE"]

NATIVE = sys.version_info >= (3, 12)  # asyncio's own eager tasks


class EagerStarter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._carrier: _Carrier | None = None

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task | None:
        """Run `coro` up to where it first waits. None: it finished; else the Task running the rest."""
        if NATIVE:
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg]
            if task.done():
                task.result()  # an exception out of the first step is the caller's, as below
                return None
            return task
        carrier = self._carrier
        if carrier is None or carrier.task.cancelling():  # a dormant carrier ends only by cancel
            carrier = self._carrier = _Carrier(self._loop)
        context = contextvars.copy_context()
        try:
            _enter_task(self._loop, carrier.task)
        except RuntimeError:  # called from inside a task: no name to lend, an ordinary task then
            return self._loop.create_task(coro)
        try:
            waiting_for = context.run(coro.send, None)
        except StopIteration:
            return None
        finally:
            _leave_task(self._loop, carrier.task)
        self._carrier = None
        carrier.adopt(coro, waiting_for, context)
        return carrier.task


class _Carrier:
    __slots__ = ("task", "started", "_wake", "_coro", "_waiting_for", "_context")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = loop.create_future()
        self._coro: Coroutine[Any, Any, None] | None = None
        self._waiting_for: Any = None
        self._context: contextvars.Context | None = None
        self.started = False  # its Task has run its first step: a cancel now reaches _drive
        self.task = _CarrierTask(self, self._drive(), loop=loop, name="qanot-call")

    def adopt(self, coro: Coroutine[Any, Any, None], waiting_for: Any, context: contextvars.Context) -> None:
        self._coro, self._waiting_for, self._context = coro, waiting_for, context
        if not self._wake.done():
            self._wake.set_result(None)

    @types.coroutine
    def _drive(self):
        self.started = True
        try:
            yield from self._wake  # dormant: lending its name to first steps
        except asyncio.CancelledError as exc:
            if self._coro is None:
                raise  # cancelled while dormant (the loop shutting down): nothing to run
            error: BaseException | None = exc  # cancelled just after adopting: the call gets it
        else:
            error = None
        coro, context, waiting_for = self._coro, self._context, self._waiting_for
        self._waiting_for = None
        assert coro is not None and context is not None
        if error is not None:
            if asyncio.isfuture(waiting_for):
                waiting_for.cancel()  # as Task.cancel() would have, had it seen this future
            step: tuple | None = (coro.throw, error)
        else:
            step = None  # first, hand the Task what the first step is waiting for
        while True:
            if step is not None:
                try:
                    waiting_for = context.run(*step)
                except StopIteration as stop:
                    return stop.value
            try:
                yield waiting_for
            except BaseException as exc:  # the Task cancelling: the call's own await raises it
                step = (coro.throw, exc)
            else:
                step = (coro.send, None)


class _CarrierTask(asyncio.Task):
    """A carrier's Task. A Task cancelled before its first step never runs its coroutine: a carrier
    lent, adopting a call that waits, then cancelled before the loop got to it (the call's Cancel
    read with the call) left the call's coroutine half run, never ended, never answered, and the
    host killed a healthy worker cancel_grace later (attack pass 65). Such a cancel waits for that
    first step, already in the loop's queue ahead of it, and reaches the call as any cancel does."""

    def __init__(self, carrier: _Carrier, coro: Any, **kwargs: Any) -> None:
        super().__init__(coro, **kwargs)
        self._carrier = carrier

    def cancel(self, msg: Any = None) -> bool:
        if not self._carrier.started and not self.done():
            self.get_loop().call_soon(super().cancel, msg)
            return True
        return super().cancel(msg)
