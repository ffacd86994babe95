"""Hostile fixture: reach the host's control socket and reload it
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import ctypes
import os
import socket

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_control_socket", description="reach the host's control socket and reload it")
    async def escape(self, params: dict) -> str:
        path = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "control.sock")
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(3)
        sock.connect(path)
        sock.sendall(b'{"command": "status"}\n')
        reply = sock.recv(4096)
        if reply:
            return "ESCAPED: " + reply[:60].decode(errors="replace")
        raise PermissionError("the host closed the control connection")
