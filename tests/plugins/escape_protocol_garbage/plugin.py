"""Hostile fixture: write garbage into the protocol pipe
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

    @tool(name="escape_protocol_garbage", description="write garbage into the protocol pipe")
    async def escape(self, params: dict) -> str:
        import fcntl
        for fd in map(int, os.listdir("/proc/self/fd")):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") and \
                        fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY and fd > 2:
                    os.write(fd, b"\xff\xff\xff\xffgarbage")
            except OSError:
                pass
        import asyncio
        await asyncio.sleep(5)
        return "ESCAPED: still running after writing garbage"
