"""Hostile fixture (attack pass 30): move a socket's data into a pipe with splice(): what a pipe holds
so is charged to no memory cgroup, and a host-made socket's peer keeps sending as it drains.
Returns "ESCAPED ..." if the attack worked; otherwise raises what stopped it."""

import ctypes
import os
import socket

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
SPLICE = 275  # x86_64


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_splice", description="splice a socket's data into a pipe")
    async def escape(self, params: dict) -> str:
        here, there = socket.socketpair()
        there.sendall(b"x" * 4096)
        read_end, write_end = os.pipe()
        try:
            moved = libc.syscall(SPLICE, here.fileno(), None, write_end, None, 4096, 0)
            if moved >= 0:
                return f"ESCAPED: splice moved {moved} bytes from a socket into a pipe"
            raise PermissionError(f"splice: {os.strerror(ctypes.get_errno())}")
        finally:
            for fd in (read_end, write_end):
                os.close(fd)
            here.close()
            there.close()
