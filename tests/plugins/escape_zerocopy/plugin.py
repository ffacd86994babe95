"""Hostile fixture (attack pass 31): TCP_ZEROCOPY_RECEIVE maps a socket's received pages into the
plugin, where no cgroup counts them (704 MB pinned through one host-made connection). Asked on a TCP
socket of its own: the sandbox refuses the option itself, whatever the socket. Returns "ESCAPED ..."
if the option was taken; otherwise raises what stopped it."""

import ctypes
import os
import socket

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
TCP_ZEROCOPY_RECEIVE = 35


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_zerocopy", description="ask for TCP zero-copy receive")
    async def escape(self, params: dict) -> str:
        with socket.socket() as sock:
            request = ctypes.create_string_buffer(64)  # struct tcp_zerocopy_receive, zeroed
            length = ctypes.c_uint32(64)
            if libc.getsockopt(sock.fileno(), socket.IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE, request,
                               ctypes.byref(length)) == 0:
                return "ESCAPED: TCP_ZEROCOPY_RECEIVE answered"
            raise PermissionError(f"TCP_ZEROCOPY_RECEIVE: {os.strerror(ctypes.get_errno())}")
