"""The host's event loop: uvloop where it is installed, asyncio's own otherwise.

The worker picks its loop with code of its own (qanot_worker/eventloop.py): the two sides share the
wire protocol and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

__all__ = ["run"]

uvloop: Any
try:
    import uvloop
except ImportError:  # not on every platform; asyncio's loop is a fine fallback
    uvloop = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop is not None else None) as runner:
        return runner.run(coro)
