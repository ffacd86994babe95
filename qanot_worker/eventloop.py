"""Run a coroutine on uvloop where it is installed, on asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

__all__ = ["run", "loop_name"]

uvloop: Any
try:
    import uvloop
except ImportError:  # uvloop does not exist on every platform; asyncio's loop is a fine fallback.
    uvloop = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def loop_name() -> str:
    return "uvloop" if uvloop is not None else "asyncio"
