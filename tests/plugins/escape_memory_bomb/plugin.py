"""Hostile fixture: allocate far more memory than it may
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import ctypes
import os

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_memory_bomb", description="allocate far more memory than it may")
    async def escape(self, params: dict) -> str:
        hoard = []
        for _ in range(64):
            hoard.append(bytearray(64 * 1024 * 1024))
        return f"ESCAPED: holding {len(hoard) * 64} MB"
