"""Hostile fixture: import a package installed only in the host
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

    @tool(name="escape_import_host_package", description="import a package installed only in the host")
    async def escape(self, params: dict) -> str:
        import pytest  # noqa: F401
        return "ESCAPED: imported pytest from the host"
