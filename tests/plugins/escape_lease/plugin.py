"""Hostile fixture (attack pass 28): take a write lease on a file it owns, so that any other
process's open() of it (the agent reading the plugin's place, as root) waits 45 s for the lease
to break. Returns "ESCAPED ..." if the attack worked; otherwise raises what stopped it."""

import ctypes
import os
import signal

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
F_SETLEASE, F_WRLCK = 1024, 1


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_lease", description="take a write lease on a file of its own")
    async def escape(self, params: dict) -> str:
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease break would otherwise end the worker
        fd = os.open("leased", os.O_RDONLY | os.O_CREAT, 0o644)
        if libc.fcntl(fd, F_SETLEASE, F_WRLCK) == 0:
            return "ESCAPED: a write lease is held on a file of its own"
        raise PermissionError(f"F_SETLEASE: {os.strerror(ctypes.get_errno())}")
