"""Hostile fixture: gain privileges: no_new_privs must be set
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

    @tool(name="escape_setuid", description="gain privileges: no_new_privs must be set")
    async def escape(self, params: dict) -> str:
        with open("/proc/self/status") as f:
            flags = dict(line.split(":", 1) for line in f if ":" in line)
        if flags.get("NoNewPrivs", "").strip() != "1":
            return "ESCAPED: no_new_privs is not set"
        if os.getuid() == 0 or os.geteuid() == 0 or flags["Uid"].split()[0] == "0":
            return "ESCAPED: the worker runs as root"
        if int(flags["CapEff"], 16) & ~(1 << 2):  # anything beyond CAP_DAC_READ_SEARCH
            return "ESCAPED: capabilities " + flags["CapEff"].strip()
        try:
            os.setuid(0)
        except PermissionError:
            raise PermissionError("NoNewPrivs: 1, not root, setuid(0) refused") from None
        return "ESCAPED: setuid(0) worked"
