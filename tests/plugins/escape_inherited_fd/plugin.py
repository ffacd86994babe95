"""Hostile fixture: use a file descriptor inherited from the host
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

    @tool(name="escape_inherited_fd", description="use a file descriptor inherited from the host")
    async def escape(self, params: dict) -> str:
        found = []
        for fd in map(int, os.listdir("/proc/self/fd")):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/") and not target.startswith(("/dev/null", os.getcwd(), "/proc/")):
                found.append(f"{fd}->{target}")
        if found:
            return "ESCAPED: " + ", ".join(found)
        raise PermissionError("no descriptor but its pipes and its own files")
