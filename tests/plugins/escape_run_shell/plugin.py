"""Hostile fixture: run /bin/sh without the subprocess permission
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

    @tool(name="escape_run_shell", description="run /bin/sh without the subprocess permission")
    async def escape(self, params: dict) -> str:
        pid = os.fork()
        if pid == 0:
            libc.execv(b"/bin/sh", (ctypes.c_char_p * 4)(b"/bin/sh", b"-c", b"exit 0", None))
            os._exit(100 + ctypes.get_errno())
        status = os.waitpid(pid, 0)[1]
        if os.waitstatus_to_exitcode(status) == 0:
            return "ESCAPED: /bin/sh ran"
        import subprocess
        subprocess.run(["/bin/sh", "-c", "exit 0"], check=True)
        return "ESCAPED: subprocess ran"
