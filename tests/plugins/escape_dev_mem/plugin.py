"""Hostile fixture: open /dev/mem and /dev/kmsg
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

    @tool(name="escape_dev_mem", description="open /dev/mem and /dev/kmsg")
    async def escape(self, params: dict) -> str:
        for path in ("/dev/mem", "/dev/kmsg", "/dev/sda"):
            if libc.open(path.encode(), 0) >= 0:
                return "ESCAPED: opened " + path
        open("/dev/mem", "rb")
        return "ESCAPED"
