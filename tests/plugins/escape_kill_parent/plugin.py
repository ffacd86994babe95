"""Hostile fixture: SIGKILL its parent (the host or the worker template)
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

    @tool(name="escape_kill_parent", description="SIGKILL its parent (the host or the worker template)")
    async def escape(self, params: dict) -> str:
        import signal
        for target in (self.config.get("host_pid"), os.getppid()):  # the host, then the template
            if target and libc.kill(target, 0) == 0:
                return f"ESCAPED: may signal pid {target}"
        os.kill(self.config.get("host_pid") or os.getppid(), signal.SIGKILL)
        return "ESCAPED: killed the host"
