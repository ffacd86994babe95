"""The host's event loop: uvloop where it is installed, asyncio's own otherwise.

The worker picks its loop with code of its own (qanot_worker/eventloop.py): the two sides share the
wire protocol and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

__all__ = ["run", "run_to_end"]

T = TypeVar("T")

uvloop: Any
try:
    import uvloop
except ImportError:  # not on every platform; asyncio's loop is a fine fallback
    uvloop = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        return runner.run(coro)


async def run_to_end(awaitable: Awaitable[T], undo: Callable[[T], object],
                     abandoned: Callable[[], object] | None = None) -> T:
    """`awaitable`'s result; if the caller is cancelled (or it fails), `abandoned()` at once, then
    `awaitable` still runs to its end and what it made is undone with `undo(result)`. For connecting
    pipes: a connect_read_pipe or connect_write_pipe cancelled under uvloop closes the descriptor but
    leaves its file object to close the same number again when collected, by then maybe another
    worker's pipe; run to its end, the transport closes it once."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except BaseException:
        if abandoned is not None:
            abandoned()
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        if not isinstance(result, BaseException):
            undo(result)
        raise
