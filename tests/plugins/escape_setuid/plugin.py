"""Hostile fixture: gain privileges: no_new_privs must be set
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import ctypes
import os

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def errno_text() -> str:
    return os.strerror(ctypes.get_errno())


class QanotPlugin(Plugin):
    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_setuid", description="gain privileges: no_new_privs must be set")
    async def escape(self, params: dict) -> str:
        with open("/proc/self/status") as f:
            flags = dict(line.split(":", 1) for line in f if ":" in line)
        if flags.get("NoNewPrivs", "").strip() != "1":
            return "ESCAPED: no_new_privs is not set"
        raise PermissionError("NoNewPrivs: 1")
