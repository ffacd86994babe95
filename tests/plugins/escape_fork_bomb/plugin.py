"""Hostile fixture: fork without end
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

    @tool(name="escape_fork_bomb", description="fork without end")
    async def escape(self, params: dict) -> str:
        children = 0
        try:
            while children < 100000:
                pid = os.fork()
                if pid == 0:
                    import time
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as exc:
            return f"contained after {children} forks: {exc}"
        return f"ESCAPED: {children} processes"
