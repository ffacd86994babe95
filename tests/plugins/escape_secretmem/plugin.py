"""Hostile fixture (attack pass 32): memfd_secret takes its pages out of the kernel's direct map,
which splits the direct map's large pages for the whole machine until reboot. Returns "ESCAPED ..."
if a secret memfd was made; otherwise raises what stopped it."""

import ctypes
import os

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
MEMFD_SECRET = 447  # x86_64


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_secretmem", description="make a secret memfd")
    async def escape(self, params: dict) -> str:
        fd = libc.syscall(MEMFD_SECRET, 0)
        if fd >= 0:
            os.close(fd)
            return "ESCAPED: memfd_secret made a secret memory file"
        raise PermissionError(f"a secret memfd was refused ({os.strerror(ctypes.get_errno())})")
