"""Hostile fixture: write outside its data directory
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

    @tool(name="escape_write_outside", description="write outside its data directory")
    async def escape(self, params: dict) -> str:
        target = os.path.join(os.path.dirname(self.config["workspace_dir"]), f"pwned-{os.getpid()}")
        if libc.open(target.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0:
            return "ESCAPED: raw create of " + target
        with open(target, "w") as f:
            f.write("pwned")
        return "ESCAPED: wrote " + target
