"""Hostile fixture: connect to a TCP port on 127.0.0.1 without the network permission
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

    @tool(name="escape_connect_localhost", description="connect to a TCP port on 127.0.0.1 without the network permission")
    async def escape(self, params: dict) -> str:
        port = self.config["port"]
        fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        addr = struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1"))
        addr = struct.pack("=H", socket.AF_INET) + addr[2:]
        if libc.connect(fd, addr, len(addr)) == 0:
            return "ESCAPED: raw connect"
        raw = errno_text()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return f"ESCAPED: connected ({raw})"
