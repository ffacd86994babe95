"""Hostile fixture: bind and listen on a TCP port without the network permission
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import ctypes
import os
import socket
import struct

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_bind_port", description="bind and listen on a TCP port without the network permission")
    async def escape(self, params: dict) -> str:
        fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", 0, socket.inet_aton("127.0.0.1"))
        if libc.bind(fd, addr, len(addr)) == 0 and libc.listen(fd, 1) == 0:
            return "ESCAPED: raw bind and listen"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return "ESCAPED: listening"
