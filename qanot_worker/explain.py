"""An audit hook that explains denials: when plugin code opens a path, connects or starts a process
that its grant does not cover, the error names the permission to grant and the key to change,
instead of a bare "Permission denied" or "No such file".

It only explains. The kernel enforces (namespaces, Landlock, seccomp), also against ctypes and raw
system calls, which no audit hook sees.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import threading
from typing import Any, Callable

from . import protocol as p
from .eventloop import CONNECT_EVENT

__all__ = ["explain_denials", "DenialReports", "denial_reports"]

DENIED_REPORT_SECONDS = 0.1  # a worker's denials go to the host in one report at most this often

STARTS_A_PROCESS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                    "os.forkpty")


def explain_denials(spec: p.SandboxSpec, plugin: str) -> None:
    resolved = {x: os.path.join(_real_path(x), "") for x in {*spec.read_paths, *spec.exec_paths, *spec.write_paths}}
    readable = tuple(resolved.values())
    writable = tuple(resolved[x] for x in spec.write_paths)
    grant = f"config.json: host.plugins.{plugin}.permissions"
    reachable = _reachability(spec)

    # The host's own paths under /tmp (a checkout there, a state_dir): the worker's root binds them on
    # its private /tmp, with the directories on their way, and those are not the plugin's /tmp (a
    # clone under /tmp had its plugins list its skeleton, and told ENOENT, not what to grant)
    bound = [*spec.read_paths, *spec.exec_paths, *spec.write_paths]
    in_tmp = tuple(os.path.join(x, "") for x in bound if x.startswith("/tmp/"))
    hosts_in_tmp = tuple(sorted({"/tmp/" + x[5:].split("/", 1)[0] + "/" for x in bound if x.startswith("/tmp/")}))

    def covered(path: str, roots: tuple[str, ...]) -> bool:
        real = os.path.join(os.path.realpath(path), "")
        if hosts_in_tmp and real.startswith(hosts_in_tmp) and not real.startswith(in_tmp):
            return False
        return real.startswith(roots)

    private = tuple(os.path.join(os.path.normpath(x), "") for x in spec.host_private if x)  # resolved by the host

    def denied(what: str) -> PermissionError:
        return PermissionError(errno.EACCES, f"denied by the sandbox: {what}")

    def not_granted(doing: str, path: str) -> PermissionError:
        """A path no grant may reach (the host's config.json and state_dir: a config that grants
        them is refused) is not said to need the 'filesystem' permission (newcomer pass 56)."""
        real = os.path.realpath(path)  # by their names alone: under /tmp covered() says no to them all
        if os.path.join(real, "").startswith(private) or real in (x.rstrip("/") for x in private):
            return denied(f"{doing} {path}: the host's own files (its config.json, its state_dir) are no "
                          "plugin's, whatever it is granted")
        return denied(f"{doing} {path} needs the 'filesystem' permission ({grant})")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            mode = args[1] or "r"
            wants_write = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & 3)
            if not covered(path, writable if wants_write else readable):
                raise not_granted("writing" if wants_write else "reading", path)
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            if not covered(path, readable):
                raise not_granted("listing", path)
        elif event in ("socket.getaddrinfo", "socket.gethostbyname") and not spec.network \
                and _needs_dns(args[0]):
            # Without a network there is no DNS either: the plugin would see "Temporary failure in
            # name resolution" and never learn that a grant is missing. Still a gaierror, for code
            # that catches that. The host is told too: a library that wraps the error in its own
            # ("Can't connect to MySQL server") leaves the operator nothing else (compat pass 57).
            port = args[1] if event == "socket.getaddrinfo" and len(args) > 1 else None
            denial_reports.note(_destination(args[0], port))
            raise socket.gaierror(socket.EAI_AGAIN, f"denied by the sandbox: resolving {os.fsdecode(args[0])!r} "
                                                    f"needs the 'network' permission ({grant})")
        elif event in ("socket.connect", "socket.bind") and not spec.network and _is_inet(args[0]):
            doing = "connecting to" if event == "socket.connect" else "binding"
            if event == "socket.connect" and isinstance(args[1], tuple) and len(args[1]) >= 2:
                denial_reports.note(_destination(args[1][0], args[1][1]))
            raise denied(f"{doing} {args[1]} needs the 'network' permission ({grant})")
        elif event in ("socket.connect", "socket.getaddrinfo") and spec.egress_filtered:
            address = args[1] if event == "socket.connect" else args[:2]
            if (event == "socket.getaddrinfo" or _is_inet(args[0])) and not reachable(address):
                host, port = address[0], address[1]
                # a look-up refused (create_connection's first step) is the connect refused
                denial_reports.note(_destination(host, port))
                raise denied(f"{host}:{port} is not among the 'network' hosts and ports granted ({grant}.network: "
                             f"add \"{host}:{port}\" to its \"hosts\")")
        elif event == CONNECT_EVENT and (not spec.network or spec.egress_filtered):  # the worker's loop's
            address = (args[0], args[1])
            if not spec.network:
                denial_reports.note(_destination(*address))
                raise denied(f"connecting to {address} needs the 'network' permission ({grant})")
            if not reachable(address):
                host, port = address
                denial_reports.note(_destination(host, port))
                raise denied(f"{host}:{port} is not among the 'network' hosts and ports granted ({grant}.network: "
                             f"add \"{host}:{port}\" to its \"hosts\")")
        elif event in STARTS_A_PROCESS and not spec.subprocess:
            raise denied(f"starting a process needs the 'subprocess' permission ({grant})")

    sys.addaudithook(hook)


class DenialReports:
    """The connects this worker's own check refused, told to the host (p.Denied), which counts
    them with those it refuses itself: they never reach it (the newcomer of pass 56's `status`
    said 0 denied while every connect of his plugin was refused here). From any thread, at any
    rate: one report per DENIED_REPORT_SECONDS at most, with the first few destinations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._destinations: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send: Callable[[p.Denied], None] | None = None
        self._due = False

    def attach(self, loop: asyncio.AbstractEventLoop, send: Callable[[p.Denied], None]) -> None:
        with self._lock:
            self._loop, self._send = loop, send
            pending = self._count and not self._due
            self._due = self._due or bool(pending)
        if pending:
            loop.call_soon(self._arm)

    def note(self, destination: str) -> None:
        with self._lock:
            self._count += 1
            if len(self._destinations) < p.MAX_DENIED_DESTINATIONS and destination not in self._destinations:
                self._destinations.append(destination[:300])
            if self._due or self._loop is None:
                return
            self._due = True
            loop = self._loop
        try:
            loop.call_soon_threadsafe(self._arm)
        except RuntimeError:  # the loop is closed: the worker is ending
            pass

    def _arm(self) -> None:
        assert self._loop is not None
        self._loop.call_later(DENIED_REPORT_SECONDS, self._flush)

    def _flush(self) -> None:
        with self._lock:
            count, destinations = self._count, self._destinations
            self._count, self._destinations, self._due = 0, [], False
        if count and self._send is not None:
            self._send(p.Denied(min(count, p.MAX_DENIED_COUNT), destinations))


denial_reports = DenialReports()


def _real_path(path: str) -> str:
    """os.path.realpath, as the kernel resolves it: one open and one readlink where realpath (pure
    Python in 3.11) makes an lstat per component (31 paths of a worker's grant took 0.28 ms of its
    start so). Before the hook only: inside it, the open would be audited too. A path that is not
    there (realpath resolves what part of it is) or a descriptor refused: realpath's own way."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)
    return real if real.startswith("/") and not real.endswith(" (deleted)") else os.path.realpath(path)


def _reachability(spec: p.SandboxSpec):
    any_host_ports = set(spec.tcp_ports)
    granted_pairs = {(host.lower(), port) for host, port in spec.tcp_hosts}
    granted_ports = any_host_ports | {port for _, port in granted_pairs}

    def reachable(address: object) -> bool:
        """False only where the grant surely refuses: an IP literal may be a granted name's address,
        which the host checks when it makes the connection."""
        if not (isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int)):
            return True  # a service name, or no port: decided at connect time
        host, port = address[0], address[1]
        if port in any_host_ports or port == 0:
            return True
        if port not in granted_ports:
            return False
        name = os.fsdecode(host).lower() if isinstance(host, (str, bytes)) else ""
        if not name or (name, port) in granted_pairs or _is_ip_literal(name):
            return True
        # a name may resolve to an address granted on this port: the host decides at the connect
        return any(granted_port == port and _is_ip_literal(granted) for granted, granted_port in granted_pairs)

    return reachable


def _destination(host: object, port: object) -> str:
    """host:port as the host quotes it (the port left out when there is none)."""
    name = os.fsdecode(host) if isinstance(host, (str, bytes)) else str(host)
    return f"{name}:{port}" if isinstance(port, int) else name


def _is_inet(sock: object) -> bool:
    return isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6)


def _needs_dns(host: object) -> bool:
    """A name only a nameserver can answer (not an address, not localhost, which /etc/hosts has)."""
    if not isinstance(host, (str, bytes)):
        return False
    name = os.fsdecode(host).strip().rstrip(".").lower()
    return bool(name) and name not in ("localhost", "localhost.localdomain") and not _is_ip_literal(name)


def _is_ip_literal(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name.strip("[]").split("%")[0])
            return True
        except OSError:
            pass
    return False
