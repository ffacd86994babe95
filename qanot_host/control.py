"""A unix socket in state_dir through which `qanot-host status` and `reload` reach a running host.

One JSON request line in, one JSON reply line out. The socket is created mode 0600: whoever can
use it can restart plugins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

import psutil

from .errors import QanotHostError

if TYPE_CHECKING:
    from .host import Host

__all__ = ["ControlServer", "control_request", "socket_path"]

log = logging.getLogger("qanot_host.control")
MAX_REQUEST = 65536


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "control.sock")


class ControlServer:
    def __init__(self, host: "Host") -> None:
        self._host = host
        self._server: asyncio.AbstractServer | None = None
        self.path = socket_path(host.config.host.state_dir)

    async def start(self) -> None:
        """Listen on state_dir/control.sock; without it the host still runs, minus status/reload."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.exists(self.path):
            try:
                await control_request(self.path, "ping")
            except QanotHostError:
                os.unlink(self.path)  # left behind by a host that died
            else:
                raise QanotHostError(f"another qanot-host is running with state_dir "
                                     f"{self._host.config.host.state_dir} ({self.path})")
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)
        except OSError as exc:  # e.g. a path longer than a unix socket address allows
            log.warning("no control socket at %s (%s): `qanot-host status` and `reload` will not "
                        "reach this host; SIGHUP still reloads", self.path, exc.strerror or exc)
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._from_worker(writer):
            # Landlock (ABI 7) does not cover connect() to a pathname socket: refuse plugins here.
            log.warning("control socket: refused a connection from worker process %s", _peer_pid(writer))
            try:  # read what it sent first: closing on unread data would reset, not close, the connection
                await asyncio.wait_for(reader.readline(), 1)
            except (asyncio.TimeoutError, OSError, ValueError):
                pass
            writer.close()
            return
        try:
            request = json.loads(await asyncio.wait_for(reader.readline(), 5))
            reply = await self._answer(request.get("command"))
        except (ValueError, AttributeError, asyncio.TimeoutError) as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        except QanotHostError as exc:
            reply = {"ok": False, "error": str(exc)}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    def _from_worker(self, writer: asyncio.StreamWriter) -> bool:
        """True if the peer is one of our workers or any process they started."""
        pid = _peer_pid(writer)
        if pid is None:
            return True
        try:
            lineage = {pid, *(parent.pid for parent in psutil.Process(pid).parents())}
        except psutil.Error:
            return True
        return bool(lineage & self._host.worker_pids())

    async def _answer(self, command: Any) -> dict[str, Any]:
        match command:
            case "ping":
                return {"ok": True}
            case "status":
                return {"ok": True, "pid": os.getpid(), "plugins": self._host.status()}
            case "reload":
                return {"ok": True, "reload": await self._host.reload()}
        return {"ok": False, "error": f"unknown command {command!r}"}


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", creds)[0]


async def control_request(path: str, command: str, timeout: float = 60.0) -> dict[str, Any]:
    """Send one command to a running host; QanotHostError if none answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
    except (OSError, asyncio.TimeoutError) as exc:
        raise QanotHostError(f"no running qanot-host answers at {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        writer.write(json.dumps({"command": command}).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    reply = json.loads(line or b"{}")
    if not reply.get("ok"):
        raise QanotHostError(reply.get("error", "the host closed the control connection"))
    return reply
