"""Hostile fixture: fill the disk with one huge file
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

    @tool(name="escape_huge_file", description="fill the disk with one huge file")
    async def escape(self, params: dict) -> str:
        chunk = b"x" * (1 << 20)
        with open("huge.bin", "wb") as f:
            for _ in range(64):
                f.write(chunk)
                f.flush()
        return "ESCAPED: wrote 64 MB"
