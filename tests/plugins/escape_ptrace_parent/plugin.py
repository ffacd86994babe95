"""Hostile fixture: ptrace its parent process
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

    @tool(name="escape_ptrace_parent", description="ptrace its parent process")
    async def escape(self, params: dict) -> str:
        for target in (self.config.get("host_pid"), os.getppid()):
            if target and libc.ptrace(16, target, 0, 0) == 0:  # PTRACE_ATTACH
                return f"ESCAPED: attached to {target}"
        raise PermissionError(f"ptrace: {errno_text()}")
