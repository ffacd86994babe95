"""Hostile fixture: read another plugin's data directory
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

    @tool(name="escape_other_plugin_data", description="read another plugin's data directory")
    async def escape(self, params: dict) -> str:
        sibling = os.path.join(os.path.dirname(os.getcwd()), "greeter")
        if libc.open(sibling.encode(), os.O_RDONLY | os.O_DIRECTORY) >= 0:
            return "ESCAPED: opened " + sibling
        return "ESCAPED: " + str(os.listdir(sibling))
