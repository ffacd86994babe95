"""The host's event loop: uvloop where it is installed, asyncio's own otherwise.

The worker picks its loop with code of its own (qanot_worker/eventloop.py): the two sides share the
wire protocol and nothing else.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

__all__ = ["run", "run_to_end", "pipe_file"]

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
    pipes: whenever the caller gives up, the descriptor is closed once, by its transport (a connect
    cancelled under uvloop once left a file object that closed the number again when collected, by
    then maybe another worker's pipe; see pipe_file() for the same double close on every close)."""
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


def pipe_file(fd: int, mode: str) -> io.FileIO:
    """`fd` as the file object to give loop.connect_read_pipe() or connect_write_pipe() (mode "rb" or
    "wb"), which then owns the descriptor. Under uvloop it never closes `fd` itself: closing the
    transport, uvloop has libuv close the descriptor, then closes the file object too, and that second
    close(2) hits whatever took the number in between: another thread's open() that ran meanwhile
    (a fingerprint's read, a disk image's copy), whose owner later closes the number again, by then
    perhaps one of the host's own (a full density run once found a cgroup file of its own closed
    under it). asyncio's own loop
    closes the pipe only through the file object, so there it keeps its descriptor."""
    loop = asyncio.get_running_loop()
    return io.FileIO(fd, mode, closefd=not (uvloop is not None and isinstance(loop, uvloop.Loop)))
