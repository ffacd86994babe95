"""Hostile fixture: plugin code writing frames of its own into the worker's protocol pipe (attack
pass 52): Pong frames no ping asked for, or reports of denied connects, as fast as the pipe takes
them. The host must end the worker, not spend its loop on them."""

import os
import struct
import threading
import time

import msgspec
from qanot.plugins.base import Plugin, tool
from qanot_worker.protocol import messages as p


def _write_only_pipes() -> list[int]:
    """The protocol pipe is among the write-only pipes past stderr (the others carry logs, where
    these bytes are only text)."""
    import fcntl
    found = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") and \
                    fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                found.append(fd)
        except OSError:
            pass
    return found


def _flood_pongs(message: msgspec.Struct | None = None) -> None:
    body = msgspec.msgpack.encode(message or p.Pong(0))
    data = (struct.pack(">I", len(body)) + body) * 1024
    for _ in range(200):
        for fd in _write_only_pipes():
            try:
                os.write(fd, data)
            except OSError:
                return
        time.sleep(0.01)


class QanotPlugin(Plugin):
    name = "forged_frames"

    def get_tools(self):
        return self._collect_tools()

    @tool(name="forged_pongs", description="write unasked-for Pong frames into the protocol pipe")
    async def pongs(self, params: dict) -> str:
        threading.Thread(target=_flood_pongs, daemon=True).start()
        import asyncio
        await asyncio.sleep(5)
        return "ESCAPED: still served after flooding Pongs"

    @tool(name="forged_denials", description="write reports of denied connects into the protocol pipe")
    async def denials(self, params: dict) -> str:
        threading.Thread(target=_flood_pongs, args=(p.Denied(1000, ["example.com:443"]),), daemon=True).start()
        import asyncio
        await asyncio.sleep(5)
        return "ESCAPED: still served after flooding denial reports"

    @tool(name="forged_alive", description="block the loop once answered, while a thread writes a report of "
          "denied connects every 0.2 s (a pace the host takes): no sign of life")
    async def alive(self, params: dict) -> str:
        import asyncio

        def reports() -> None:
            import fcntl
            body = msgspec.msgpack.encode(p.Denied(1, ["example.com:443"]))
            # the protocol pipe alone, the one not closed on exec (garbage in the event loop's own
            # signal pipe ends the worker with SIGSEGV, which is no answer to the question asked)
            pipes = [fd for fd in _write_only_pipes() if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC]
            while True:
                for fd in pipes:
                    try:
                        os.write(fd, struct.pack(">I", len(body)) + body)
                    except OSError:
                        return
                time.sleep(0.2)
        threading.Thread(target=reports, daemon=True).start()
        asyncio.get_running_loop().call_later(0.2, time.sleep, 120)
        return "blocking"

    @tool(name="forged_ok", description="answers")
    async def ok(self, params: dict) -> str:
        return "ok"
