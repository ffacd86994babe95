"""Run a coroutine on uvloop where it is installed, on asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Coroutine

__all__ = ["run", "loop_name", "CONNECT_EVENT"]

CONNECT_EVENT = "qanot_worker.connect"  # (host, port): a connection the loop is asked to make

uvloop: Any
try:
    import uvloop
except ImportError:  # uvloop does not exist on every platform; asyncio's loop is a fine fallback.
    uvloop = None

if uvloop is not None:
    class AuditedLoop(uvloop.Loop):
        """uvloop resolves names in libuv, where Python's audit hooks never hear of it (asyncio's own
        loop calls socket.getaddrinfo, which raises the audit event). A worker's loop raises it, so
        the sandbox's explanation of a denial (a name resolved without the network grant) reaches a
        plugin's aiohttp as it reaches its urllib."""

        async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,  # noqa: A002
                              proto: int = 0, flags: int = 0) -> Any:
            sys.audit("socket.getaddrinfo", host, port, family, type, proto, flags)
            return await super().getaddrinfo(host, port, family=family, type=type, proto=proto, flags=flags)

        async def create_connection(self, protocol_factory: Any, host: Any = None, port: Any = None,
                                    **kwargs: Any) -> Any:
            """asyncio.open_connection(), aiohttp's connector: uvloop resolves and connects in libuv,
            so a plugin without the grant got a bare "Permission denied", or "Temporary failure in
            name resolution" for a name, and the host heard nothing (newcomer pass 58)."""
            if host is not None and kwargs.get("sock") is None:
                sys.audit(CONNECT_EVENT, host, port)
            return await super().create_connection(protocol_factory, host, port, **kwargs)

        async def sock_connect(self, sock: Any, address: Any) -> Any:
            sys.audit("socket.connect", sock, address)  # as socket.connect() raises it
            return await super().sock_connect(sock, address)


def run(coro: Coroutine[Any, Any, Any], audited: bool = False) -> Any:
    """`audited`: a worker's loop, whose name look-ups plugin code's audit hooks see."""
    factory = None
    if uvloop is not None:
        factory = AuditedLoop if audited else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def loop_name() -> str:
    return "uvloop" if uvloop is not None else "asyncio"
