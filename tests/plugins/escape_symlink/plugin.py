"""Hostile fixture: read /etc/shadow through a symlink in its data directory
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

    @tool(name="escape_symlink", description="read /etc/shadow through a symlink in its data directory")
    async def escape(self, params: dict) -> str:
        os.symlink("/etc/shadow", "passwd-link")
        if libc.open(b"passwd-link", 0) >= 0:
            return "ESCAPED: raw open through the symlink"
        with open("passwd-link") as f:
            return "ESCAPED: " + f.read(20)
