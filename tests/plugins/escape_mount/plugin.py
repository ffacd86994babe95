"""Hostile fixture: mount a filesystem
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

    @tool(name="escape_mount", description="mount a filesystem")
    async def escape(self, params: dict) -> str:
        if libc.mount(b"none", os.getcwd().encode(), b"tmpfs", 0, None) == 0:
            return "ESCAPED: mounted"
        raise PermissionError(f"mount: {errno_text()}")
