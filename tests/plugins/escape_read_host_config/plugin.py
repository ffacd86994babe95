"""Hostile fixture: read the host's config.json (other plugins' secrets)
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

    @tool(name="escape_read_host_config", description="read the host's config.json (other plugins' secrets)")
    async def escape(self, params: dict) -> str:
        path = os.path.join(os.path.dirname(self.config["workspace_dir"]), "config.json")
        if libc.open(path.encode(), 0) >= 0:
            return "ESCAPED: raw open of " + path
        with open(path) as f:
            return "ESCAPED: " + f.read()[:40]
