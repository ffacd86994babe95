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
    deadlines = Deadlines(loop, live, lambda i, t: expired.append((i, t, live[i], loop.time() - began)))
    # one turn, timeouts mixed: each call still gets its own
    for request_id, timeout in ((1, 0.3), (2, 0.1), (3, 0.3), (4, 0.2), (5, 0.1)):
        live[request_id] = f"tool t{request_id}"
        deadlines.add(request_id, timeout)
    del live[3]  # answered in time
    del live[5]
    await wait_until(lambda: len(expired) == 3, timeout=5, what="three expiries")
    assert [(i, t, what) for i, t, what, _ in expired] == [
        (2, 0.1, "tool t2"), (4, 0.2, "tool t4"), (1, 0.3, "tool t1")]
    for (_, timeout, _, at) in expired:
        # never early (the clock ticks in ms); late only by what a loaded machine's loop may lag
        assert timeout - 0.01 <= at < timeout + 2.0
    await wait_until(lambda: deadlines._timer is None, timeout=5, what="no timer left")
    assert len(expired) == 3  # nothing left to expire: no timer either


async def test_calls_of_later_turns_expire_after_earlier_ones_and_never_early():
    """Calls of one turn share one entry; a shorter timeout made in a later turn still comes first."""
    loop = asyncio.get_running_loop()
    live: dict[int, str] = {}
    expired: list[tuple[int, float]] = []
    sent: dict[int, float] = {}
    deadlines = Deadlines(loop, live, lambda i, t: expired.append((i, loop.time() - sent[i])))
    request_id = 0
    for timeout in (0.4, 0.4, 0.15, 0.4):
        for _ in range(3):
            request_id += 1
            live[request_id], sent[request_id] = "t", loop.time()
            deadlines.add(request_id, timeout)
        await asyncio.sleep(0.02)
    await wait_until(lambda: len(expired) == 12, timeout=5, what="every call expired")
    assert [i for i, _ in expired[:3]] == [7, 8, 9]  # the 0.15 s calls of the third turn
    assert [i for i, _ in expired[3:]] == [1, 2, 3, 4, 5, 6, 10, 11, 12]
    timeouts = {i: 0.15 if 7 <= i <= 9 else 0.4 for i in sent}
    for i, after in expired:
        assert timeouts[i] - 0.01 <= after < timeouts[i] + 2.0


async def test_memory_follows_calls_in_flight_not_calls_made():
    loop = asyncio.get_running_loop()
    live: dict[int, str] = {0: "slow"}  # one slow call holds the head of the queue
    deadlines = Deadlines(loop, live, lambda *args: None)
    deadlines.add(0, 30.0)
    request_id = 0
    for _turn in range(2000):  # calls that come and go behind it, 25 a turn
        for _ in range(25):
            request_id += 1
            live[request_id] = "quick"
            deadlines.add(request_id, 30.0)
        await asyncio.sleep(0)  # the turn ends
        for done in range(request_id - 24, request_id + 1):
            del live[done]
    held = sum(len(batch) for queue in deadlines._queues.values() for _, batch in queue)
    assert len(deadlines._queues[30.0]) <= COMPACT_SLACK + 1
    assert held <= 25 * (COMPACT_SLACK + 1)  # of 50,000 calls made
    assert 0 in {i for _, batch in deadlines._queues[30.0] for i in batch}  # the slow one still waits
    deadlines.clear()
