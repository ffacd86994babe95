"""The channel's timeouts: one timer for all calls in flight (qanot_host/deadlines.py)."""

from __future__ import annotations

import asyncio

from qanot_host.deadlines import COMPACT_SLACK, Deadlines

from .conftest import wait_until


async def test_each_call_expires_at_its_own_deadline_and_ended_calls_never_do():
    loop = asyncio.get_running_loop()
    live: dict[int, str] = {}
    expired: list[tuple[int, float, str, float]] = []
    began = loop.time()
    deadlines = Deadlines(loop, live, lambda i, t, what: expired.append((i, t, what, loop.time() - began)))
    for request_id, timeout in ((1, 0.3), (2, 0.1), (3, 0.3), (4, 0.2)):
        live[request_id] = "x"
        deadlines.add(request_id, timeout, f"tool t{request_id}")
    del live[3]  # answered in time
    await wait_until(lambda: len(expired) == 3, timeout=5, what="three expiries")
    assert [(i, t, what) for i, t, what, _ in expired] == [
        (2, 0.1, "tool t2"), (4, 0.2, "tool t4"), (1, 0.3, "tool t1")]
    for (_, timeout, _, at) in expired:
        # never early (the clock ticks in ms); late only by what a loaded machine's loop may lag
        assert timeout - 0.01 <= at < timeout + 2.0
    await wait_until(lambda: deadlines._timer is None, timeout=5, what="no timer left")
    assert len(expired) == 3  # nothing left to expire: no timer either


async def test_memory_follows_calls_in_flight_not_calls_made():
    loop = asyncio.get_running_loop()
    live: dict[int, str] = {0: "slow"}  # one slow call holds the head of the queue
    deadlines = Deadlines(loop, live, lambda *args: None)
    deadlines.add(0, 30.0, "slow")
    for request_id in range(1, 50_000):  # calls that come and go behind it
        live[request_id] = "quick"
        deadlines.add(request_id, 30.0, "quick")
        del live[request_id]
    assert sum(len(queue) for queue in deadlines._queues.values()) <= COMPACT_SLACK + 1
    deadlines.clear()
