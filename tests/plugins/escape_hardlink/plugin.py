"""Hostile fixture: hard-link a file from outside into its data directory
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

    @tool(name="escape_hardlink", description="hard-link a file from outside into its data directory")
    async def escape(self, params: dict) -> str:
        if libc.link(b"/etc/passwd", b"passwd-hard") == 0:
            return "ESCAPED: hard link made"
        raise PermissionError(f"link failed: {errno_text()}")
