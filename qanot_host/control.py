"""A unix socket in state_dir through which `qanot-host status`, `reload`, `restart`, `call` and
`logs` reach a running host.

One JSON request line in, one JSON reply line out (`logs --follow`: a line for each line the plugin
writes, until the client goes). The socket is created mode 0600: whoever can use it can call tools
and restart plugins.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import psutil

from .errors import PluginUnavailable, QanotHostError, ToolNotFound
from .flock import flock_within
from .registry import call_error, redact_credentials
from .supervisor import PluginState

if TYPE_CHECKING:
    from .host import Host

__all__ = ["ControlServer", "control_request", "follow_logs", "socket_path", "host_holds", "NoRunningHost"]

log = logging.getLogger("qanot_host.control")
MAX_REQUEST = 64 * 2**20  # a call's params may be large (a file's content); the socket is the owner's only
# Connections waiting to be accepted (asyncio's default is 100: a burst of 250 `qanot-host call`s
# found it full, and each refused one took the host for gone; the kernel caps it at somaxconn).
CONNECT_BACKLOG = 4096
CONNECT_SECONDS = 5.0  # a host that is there but cannot take a connection within this is reported
LOCK_PROBE_SECONDS = 0.3  # how long a starting host lets a CLI's look at its lock (host_holds) pass


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "control.sock")


def lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, "control.lock")


def host_holds(state_dir: str) -> bool:
    """Does a serving host hold this state_dir (its control socket up or not: a host starting, or
    stopping with its workers and disks still there)?"""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, host: "Host") -> None:
        self._host = host
        self._server: asyncio.AbstractServer | None = None
        self.path = socket_path(host.config.host.state_dir)
        self._followers: set[asyncio.Task] = set()  # `logs --follow` connections, ended at close()
        self._lock = -1  # state_dir/control.lock, held while this host serves

    async def start(self) -> None:
        """Listen on state_dir/control.sock; without it the host still runs, minus status/reload.
        One serving host per state_dir, whether or not its socket could be made: a lock says so
        (two hosts on one state_dir would hand out the same uids and attach the same disks)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._take_lock()
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
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST,
                                                           backlog=CONNECT_BACKLOG)
        except OSError as exc:  # e.g. a path longer than a unix socket address allows
            log.warning("no control socket at %s (%s): `qanot-host status` and `reload` will not "
                        "reach this host; SIGHUP still reloads", self.path, exc.strerror or exc)
        finally:
            os.umask(old_umask)

    def _take_lock(self) -> None:
        path = lock_path(os.path.dirname(self.path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if not flock_within(fd, LOCK_PROBE_SECONDS, poll=0.01):  # a CLI's look (host_holds) lasts a moment
            os.close(fd)
            raise QanotHostError(f"another qanot-host is running with state_dir {self._host.config.host.state_dir} "
                                 f"(it holds {path})")
        self._lock = fd

    async def close(self, keep_lock: bool = False) -> None:
        """`keep_lock`: the host is still stopping (its workers and disks live on until host.stop()
        returns): no other host may start on this state_dir before release_lock()."""
        for task in list(self._followers):
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if not keep_lock:
            self.release_lock()

    def release_lock(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = self._from_worker(writer)
        if refused:
            # Landlock (ABI 7) does not cover connect() to a pathname socket: refuse plugins here.
            log.warning("control socket: refused a connection from %s", refused)
            try:  # read what it sent first: closing on unread data would reset, not close, the connection
                await asyncio.wait_for(reader.readline(), 1)
            except (asyncio.TimeoutError, OSError, ValueError):
                pass
            writer.close()
            return
        try:
            request = json.loads(await asyncio.wait_for(reader.readline(), 30))
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            if request.get("command") == "logs" and request.get("follow"):
                task = asyncio.current_task()
                assert task is not None
                self._followers.add(task)
                try:
                    await self._follow(request, reader, writer)
                except asyncio.CancelledError:
                    writer.close()  # the host is stopping: the follower's connection ends with it
                finally:
                    self._followers.discard(task)
                return
            reply = await self._answer(request.get("command"), request)
        except (ValueError, AttributeError, TypeError, OverflowError, RecursionError, asyncio.TimeoutError) as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        except QanotHostError as exc:
            reply = {"ok": False, "error": str(exc), "type": type(exc).__name__}
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        try:
            # a large tool result is encoded off the loop (60 MB of escapes took it 2.7 s), and one
            # over what a reply may carry is refused in words, not cut
            encoded = await asyncio.to_thread(_encode, reply) if _large(reply) else _encode(reply)
            if len(encoded) > MAX_REQUEST:
                encoded = _encode({"ok": False, "error": f"the answer is {len(encoded)} bytes encoded, over the "
                                   f"control socket's {MAX_REQUEST}: use `qanot-host call --standalone`"})
            writer.write(encoded)
            await writer.drain()
        except ConnectionError:
            pass  # the client went away: its answer goes nowhere
        finally:
            writer.close()

    def _from_worker(self, writer: asyncio.StreamWriter) -> str:
        """Why the peer is refused ("" if it is not): one of our workers or any process they started,
        by its ancestry, or by its cgroup (a double-forked daemon leaves the ancestry, not its
        plugin's cgroup); or one gone before it could be told from them (an impatient CLI, as a rule)."""
        pid = _peer_pid(writer)
        if pid is None:
            return "a process that could not be identified"
        try:
            lineage = {pid, *(parent.pid for parent in psutil.Process(pid).parents())}
        except psutil.NoSuchProcess:
            return f"process {pid}, gone before it could be identified"
        except psutil.Error:
            return f"process {pid}, which could not be identified"
        worker = f"worker process {pid}"
        if lineage & self._host.worker_pids():
            return worker
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                return worker if f"/qanot-host-{os.getpid()}/" in f.read() else ""
        except OSError:
            return f"process {pid}, gone before it could be identified"

    async def _answer(self, command: Any, request: dict[str, Any]) -> dict[str, Any]:
        host = self._host
        match command:
            case "ping":
                return {"ok": True, "config": host.config.path}
            case "status":
                return {"ok": True, "pid": os.getpid(), "plugins": host.status()}
            case "reload":
                summary = await host.reload()
                return {"ok": True, "reload": summary,
                        # as status shows them: key=value credentials in a plugin's own words redacted
                        "errors": {name: redact_credentials(host.plugins[name].error) + (
                                       "" if host.plugins[name].state is PluginState.FAILED else
                                       " (its restart policy tries again)")
                                   for name in summary["failed"] if name in host.plugins}}
            case "restart":
                return {"ok": True, "status": await host.restart_plugin(str(request.get("plugin")))}
            case "call":
                timeout = request.get("timeout")
                if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout < 1e9):
                    raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
                try:
                    result = await host.registry.invoke(str(request.get("tool")), request.get("params", {}), timeout)
                except ToolNotFound as exc:  # the index of declared tools, made in the background, may say why
                    await host.tool_index_ready()
                    why = host.registry.explain_missing(exc.tool, whole=True)
                    raise call_error(ToolNotFound(exc.tool, why)) from None
                except QanotHostError as exc:
                    raise call_error(exc) from None
                return {"ok": True, "result": result}
            case "logs":
                plugin = str(request.get("plugin"))
                ring = host.logs(plugin)
                return {"ok": True, "lines": [list(line) for line in ring.recent(int(request.get("lines", 100)))]}
            case "tools":
                return {"ok": True, "tools": host.tool_definitions(), "failed": host.not_ready()}
        return {"ok": False, "error": f"unknown command {command!r}"}

    async def _follow(self, request: dict[str, Any], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """`logs --follow`: the last lines, then each new one, until the client goes (its end of the
        socket closes: seen at once, not at the next line) or the host stops."""
        gone = asyncio.ensure_future(reader.read())
        try:
            ring = self._host.logs(str(request.get("plugin")))
            seen = ring.total - min(len(ring.lines), int(request.get("lines", 100)))
            while not gone.done():
                upto, batch = ring.total, ring.since(seen)
                for line in batch:  # a line at a time: a client that does not read holds one, not the ring
                    writer.write(_encode({"ok": True, "line": list(line)}))
                    await writer.drain()
                seen = upto
                if ring.total > seen:
                    continue  # lines came while it wrote
                changed = asyncio.ensure_future(ring.changed())
                await asyncio.wait([changed, gone], return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        except PluginUnavailable as exc:
            writer.write(_encode({"ok": False, "error": str(exc)}))
        except (ConnectionError, ValueError, OverflowError, TypeError):
            pass
        finally:
            gone.cancel()
            writer.close()


def _large(reply: dict[str, Any]) -> bool:
    result = reply.get("result")
    return isinstance(result, str) and len(result) > 2**20


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, ensure_ascii=False).encode() + b"\n"


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    try:
        return _peer_credentials(writer.get_extra_info("socket"))[0]
    except (OSError, AttributeError):
        return None


def _peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, as the kernel says."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


class NoRunningHost(QanotHostError):
    """Nothing listens at the control socket (no host runs with that state_dir). Only this lets the
    CLI start a standalone host: a host that is there but busy or slow is an error to report."""


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the host at `path`, which must be root's or this user's (the kernel says
    whose, SO_PEERCRED): in a state_dir another user could write, they listened there themselves,
    took a call's params and had their forged answer printed as the tool's result."""
    # Connected here, not by asyncio: a unix socket whose queue is full answers EAGAIN, which
    # asyncio's own loop takes for a connect under way (and hands back an unconnected socket).
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError) as exc:  # no socket, no listener
            sock.close()
            raise NoRunningHost(f"no running qanot-host answers at {path}: {exc.strerror}") from None
        except BlockingIOError:  # its queue of connections to accept is full: a host, and busy
            sock.close()
            if time.monotonic() >= deadline:
                raise QanotHostError(f"the host at {path} is too busy to take a connection (its queue of "
                                     f"{CONNECT_BACKLOG} waiting connections stayed full for "
                                     f"{CONNECT_SECONDS:g} s); nothing was sent") from None
            await asyncio.sleep(0.05)
        except OSError as exc:
            sock.close()
            raise QanotHostError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    try:
        _, uid, _ = _peer_credentials(sock)
    except OSError as exc:
        sock.close()
        raise QanotHostError(f"cannot tell who serves {path}: {exc.strerror or exc}; nothing sent") from None
    if uid not in (0, os.geteuid()):
        sock.close()
        raise QanotHostError(f"{path} is served by uid {uid}, neither root nor this user: nothing sent "
                             "(whoever can write that state_dir could listen there and forge answers)")
    return await asyncio.open_unix_connection(sock=sock, limit=MAX_REQUEST)


async def control_request(path: str, command: str, timeout: float | None = 60.0, **fields: Any) -> dict[str, Any]:
    """Send one command to a running host; NoRunningHost if none answers, QanotHostError with the
    host's own words if it refuses."""
    request = {"command": command, **fields}
    try:
        data = json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate (in params): sent escaped, so the host says where it is
        data = json.dumps(request).encode()
    reader, writer = await _connect(path)
    try:
        writer.write(data + b"\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        raise QanotHostError(f"the host at {path} did not answer {command!r} within {timeout:g} s") from None
    except ValueError:  # a line over the limit: the host refuses those itself, so this is not ours
        raise QanotHostError(f"the answer at {path} is over {MAX_REQUEST} bytes") from None
    except ConnectionError as exc:
        raise QanotHostError(f"the host at {path} closed the connection: {exc}") from None
    finally:
        writer.close()
    reply = json.loads(line or b"{}")
    if not reply.get("ok"):
        raise QanotHostError(reply.get("error", "the host closed the control connection"))
    return reply


async def follow_logs(path: str, plugin: str, lines: int):
    """`logs --follow`: yields each line (time, stream, text) as the running host sends it."""
    reader, writer = await _connect(path)
    try:
        writer.write(json.dumps({"command": "logs", "plugin": plugin, "lines": lines, "follow": True}).encode()
                     + b"\n")
        while line := await reader.readline():
            reply = json.loads(line)
            if not reply.get("ok"):
                raise QanotHostError(reply.get("error", "the host refused"))
            yield reply["line"]
    finally:
        writer.close()
