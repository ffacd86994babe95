"""Hostile fixture: rely on PYTHONPATH, LD_PRELOAD, sitecustomize or .pth files reaching it
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import ctypes
import os
import sys

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_startup_tricks", description="rely on PYTHONPATH, LD_PRELOAD, sitecustomize or .pth files reaching it")
    async def escape(self, params: dict) -> str:
        leaked = [k for k in ("PYTHONPATH", "LD_PRELOAD", "PYTHONSTARTUP", "QANOT_ESCAPE_SECRET") if k in os.environ]
        if leaked or "sitecustomize" in sys.modules or "escape_pth_ran" in sys.modules:
            return f"ESCAPED: {leaked} {sorted(m for m in sys.modules if 'custom' in m or 'pth' in m)}"
        raise PermissionError("none of the host's start-up tricks reached the worker")
