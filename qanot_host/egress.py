"""Network narrowed to host:port pairs: the host makes each TCP connection a plugin is allowed.

A worker whose grant names hosts runs in an empty network namespace, and a seccomp filter hands
each of its connect() calls to a listener the host holds (SECCOMP_RET_USER_NOTIF). For a TCP
connect the host reads the address from the worker's memory once, decides on that copy, connects a
socket of its own (in the host's namespace) and installs it in place of the plugin's socket
(SECCOMP_IOCTL_NOTIF_ADDFD). The kernel never reads the plugin's address again, so nothing another
plugin thread writes there in between counts; and every other socket the plugin has lives in a
namespace with no way out. A connected socket cannot be re-aimed: a disconnect (AF_UNSPEC) of a TCP
socket is refused here, and TCP Fast Open sends are refused by the worker's seccomp filter.

Which addresses a grant reaches is egress_policy.py's to say; this module is the mechanism. Name
resolution in the worker goes to the system's nameservers over TCP (RES_OPTIONS=use-vc, set by the
host), port 53 only: DNS queries are the one channel left open, as in any DNS-based allowlist.

Nothing is ever handed back to the kernel to decide (that would let the plugin change the
descriptor or the address between the host's look and the kernel's): UDP and other sockets are
answered ENETUNREACH, as the worker's empty namespace would, and unix sockets EACCES.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import logging
import os
import re
import select
import socket
import struct
import time
from typing import Callable, NamedTuple

from . import tcp_diag
from .egress_policy import EgressPolicy, literal_address

__all__ = ["EgressGate", "EgressPolicy", "RESOLVER_ENV", "MAX_LOGGED_DENIALS", "quotable"]

log = logging.getLogger("qanot_host.egress")

# glibc's resolver over TCP, so that DNS goes through a connect() the host decides on.
RESOLVER_ENV = {"RES_OPTIONS": "use-vc"}

NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, then seccomp_data
RESPONSE = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
IOCTL_RECV, IOCTL_SEND, IOCTL_ID_VALID, IOCTL_ADDFD = 0xC0502100, 0xC0182101, 0x40082102, 0x40182103
ADDFD_FLAG_SETFD = 1
USER_NOTIF_FLAG_CONTINUE = 1
SYS_PIDFD_GETFD = 438
SYS_CONNECT = 42
AF_UNSPEC = 0
CONNECT_TIMEOUT = 30.0
# Set on the plugin's socket before connect(): carried over to the one the host makes.
COPIED_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                  (socket.SOL_SOCKET, socket.SO_REUSEADDR)]
MAX_LOGGED_DENIALS = 50  # distinct destinations logged per worker; the count goes on
MAX_LOGGED_FAILURES = 20  # unexpected failures logged per worker (with a traceback); the rest counted
# Connections being made for one worker at once: more are answered EAGAIN. Each holds a host socket
# (a descriptor of the host's) until it connects, fails, or its connect() call goes away.
MAX_PENDING_CONNECTS = 64
STILL_WAITING_EVERY = 0.5  # how often a pending connection checks that its connect() still waits
# Notifications decided per second for one worker (a bucket of twice that): beyond, EAGAIN at once,
# so that a plugin looping on connect() cannot spend the host's CPU many times its own cpu_max.
DECISIONS_PER_SECOND = 500.0
# A host-made socket's buffers, each way (the kernel doubles the figure): its memory is the host's,
# outside the plugin's memory cgroup, so it is kept small; the plugin cannot raise it (seccomp).
SOCKET_BUFFER = 128 * 1024
# The host-made sockets a worker may hold at once: its nofile, however it holds them (a descriptor,
# a memory mapping, an orphan closed with data unsent). At the bound the host counts which still
# exist, at most every CENSUS_SPACING seconds, and a connect() waits for that count; past the bound
# it gets EMFILE.
DEFAULT_MAX_SOCKETS = 1024
CENSUS_SPACING = 0.5
# ...and, after a count that took T seconds (a plugin with thousands of mappings makes it long), not
# before 20 T: a plugin that keeps connecting at its bound costs the host at most ~5% of a core.
CENSUS_SPACING_FACTOR = 20
IPPROTO_MPTCP = 262
CARRIED_PROTOCOLS = (0, socket.IPPROTO_TCP, IPPROTO_MPTCP)
MIN_ADDRESS: dict[int, int] = {socket.AF_INET: 16, socket.AF_INET6: 24}  # sizeof sockaddr_in, SIN6_LEN_RFC2133

# A close of the host's copy of a socket the plugin holds may be the last (the plugin closed its own
# meanwhile), and then SO_LINGER makes it wait for the peer as long as the plugin set: such closes
# are made by these threads, and a socket still lingering after LINGER_BOUND seconds is ended.
LINGER_BOUND = 0.5
_CLOSER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="qanot-egress-close")

_libc = ctypes.CDLL(None, use_errno=True)


# a destination as the worker's check names it: a name or an address (IPv6 bare or bracketed), a port
DESTINATION = re.compile(r"[A-Za-z0-9._\-:\[\]%]{1,260}(:[0-9]{1,5})?")


def quotable(destination: str, redact: Callable[[str], str] | None) -> str | None:
    """A destination a worker reported, as the host may quote it; None if it is none. Plugin code
    can write these: only a host[:port] is quoted, not a sentence of its making in the host's advice
    (attack pass 57); and a name may be a secret of its config, a database's host (attack pass 58)."""
    if not DESTINATION.fullmatch(destination):
        return None
    return redact(destination) if redact is not None else destination


class EgressGate:
    """Answers one worker's connect() calls for the kernel, by its EgressPolicy."""

    def __init__(self, plugin: str, worker_pid: int, listener_fd_in_worker: int, policy: EgressPolicy,
                 max_sockets: int = DEFAULT_MAX_SOCKETS, processes: Callable[[], list[int]] | None = None) -> None:
        self.plugin = plugin
        self.policy = policy
        self.allowed = 0
        self.denied = 0
        self.over_limit = 0  # connects refused while it held max_sockets of the host's
        self.last_denied = ""
        self._max_sockets = max_sockets
        self._processes = processes or (lambda: [worker_pid])  # the plugin's, for the sockets they hold
        self._made: dict[int, tcp_diag.SocketKey] = {}  # cookie -> key, of the sockets installed
        self._connecting = 0  # allowed, not yet installed
        self._next_census = 0.0
        self._census: asyncio.Future | None = None  # the count of them being taken
        self._census_failed = False
        self._pid = worker_pid
        self._pidfd = os.pidfd_open(worker_pid)
        try:
            self._fd = _pidfd_getfd(self._pidfd, listener_fd_in_worker)
        except OSError:
            os.close(self._pidfd)
            raise
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        # What a connect() is (the address in the plugin's memory, the socket it names) is read by a
        # thread of this worker's own, made at its first connect(): reading the plugin's memory waits
        # for its mmap lock, which a plugin can keep taken for writing (mprotect over 60 000 mappings
        # from 16 threads held the host's loop 6 s in 7, attack pass 38); a pool shared by every
        # worker was held whole by 8 such plugins (attack pass 41). Only its own connects wait.
        self._inspector: concurrent.futures.ThreadPoolExecutor | None = None
        self._logged: set[tuple[str, int]] = set()
        self._failures = 0
        self._tokens = 2 * DECISIONS_PER_SECOND
        self._stamp = time.monotonic()
        self._poller = select.poll()  # RECV would block on a wake-up that is only "the worker is gone"
        self._poller.register(self._fd, select.POLLIN)
        self._loop.add_reader(self._fd, self._on_ready)

    def close(self) -> None:
        """Once the worker is gone: what it left of the host's sockets (mapped, or orphans holding
        data unsent to a peer that reads nothing) ends with it, as its descriptors did."""
        if self._fd < 0:
            return
        self._loop.remove_reader(self._fd)
        for task in self._tasks:
            task.cancel()
        if self._inspector is not None:
            self._inspector.shutdown(wait=False)  # a look under way ends as the worker's process does
        if self._census is not None:
            self._census.cancel()
        os.close(self._fd)
        os.close(self._pidfd)
        self._fd = -1
        made, self._made = self._made, {}
        for key in made.values():
            try:
                if not tcp_diag.destroy(key):
                    log.warning("plugin %s: the connections the host made for it cannot be ended by the host "
                                "(no SOCK_DESTROY here); those it still holds end as the kernel ends them", self.plugin)
                    return
            except OSError as exc:
                log.warning("plugin %s: ending a connection the host made for it failed: %s", self.plugin, exc)
                return

    def status(self) -> dict[str, object]:
        return {"allowed": self.allowed, "denied": self.denied, "over_limit": self.over_limit,
                "last_denied": self.last_denied, "grant": self.policy.describe()}

    # ---- one notification ------------------------------------------------------------------------

    def _on_ready(self) -> None:
        events = self._poller.poll(0)
        if not events or not events[0][1] & select.POLLIN:
            if events and events[0][1] & (select.POLLHUP | select.POLLERR):
                self.close()
            return
        buf = bytearray(NOTIF.size)
        try:
            fcntl.ioctl(self._fd, IOCTL_RECV, buf, True)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINTR):  # ENOENT: the caller died meanwhile
                log.error("plugin %s: egress listener failed (%s); its connects will fail", self.plugin, exc)
                self.close()
            return
        notif_id, tid, _flags, nr, _arch, _ip, fd, addr_ptr, addr_len, *_ = NOTIF.unpack(buf)
        if not self._take_token() or len(self._tasks) >= MAX_PENDING_CONNECTS:
            self._answer(notif_id, error=errno.EAGAIN)  # as a kernel short of resources would
            return
        if nr != SYS_CONNECT:
            self._answer(notif_id, USER_NOTIF_FLAG_CONTINUE)
            return
        task = self._loop.create_task(self._decide(notif_id, tid, fd, addr_ptr, addr_len))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(2 * DECISIONS_PER_SECOND, self._tokens + (now - self._stamp) * DECISIONS_PER_SECOND)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _failed(self, what: str) -> None:
        """Something unexpected, logged with its traceback: only the first few per worker, so a plugin
        that provokes it in a loop cannot flood the host's log."""
        self._failures += 1
        if self._failures <= MAX_LOGGED_FAILURES:
            log.exception("plugin %s: egress: %s%s", self.plugin, what,
                          " (later ones are counted, not logged)" if self._failures == MAX_LOGGED_FAILURES else "")

    async def _decide(self, notif_id: int, tid: int, fd: int, addr_ptr: int, addr_len: int) -> None:
        try:
            if self._inspector is None:
                self._inspector = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"qanot-egress-{self.plugin}"[:40])
            # the thread's own copies of the listener and the pidfd (it closes them): close() may
            # close the gate's while the thread still reads
            listener, pidfd = os.dup(self._fd), os.dup(self._pidfd)
            looking = self._loop.run_in_executor(self._inspector, self._inspect, listener, pidfd, notif_id, tid, fd,
                                                 addr_ptr, addr_len)
            try:
                error, copy, seen = await asyncio.shield(looking)
            except asyncio.CancelledError:  # the worker is gone: its copy is let go when the look ends
                looking.add_done_callback(self._let_go_copy)
                raise
            if copy is not None:
                self._let_go(copy)
        except Exception:  # a notification left unanswered would hang the plugin's thread for good
            self._failed("a connect() could not be decided; refused")
            self._answer(notif_id, error=errno.EACCES)
            return
        if error or seen is None:
            self._answer(notif_id, error=error)
            return
        await self._connect(notif_id, fd, *seen)

    def _let_go_copy(self, looking: asyncio.Future) -> None:
        if not looking.cancelled() and looking.exception() is None and looking.result()[1] is not None:
            self._let_go(looking.result()[1])

    def _inspect(self, listener: int, pidfd: int, notif_id: int, tid: int, fd: int, addr_ptr: int,
                 addr_len: int) -> "tuple[int, socket.socket | None, tuple | None]":
        """On a thread of its own (it may wait for the plugin's locks): the errno to answer, or 0 and
        what to connect; with the host's copy of the plugin's socket, for the loop to let go of.
        Closes `listener` and `pidfd`, its own copies."""
        try:
            return self._look(listener, pidfd, notif_id, tid, fd, addr_ptr, addr_len)
        finally:
            os.close(listener)
            os.close(pidfd)

    def _look(self, listener: int, pidfd: int, notif_id: int, tid: int, fd: int, addr_ptr: int,
              addr_len: int) -> "tuple[int, socket.socket | None, tuple | None]":
        try:
            raw = _read_memory(tid, addr_ptr, min(addr_len, 128))
            fcntl.ioctl(listener, IOCTL_ID_VALID, struct.pack("=Q", notif_id))  # tid was not reused
        except (OSError, OverflowError, ValueError):  # a pointer past the address space, too
            return errno.EFAULT, None, None
        # Never CONTINUE: the kernel would read the descriptor and the address again, and the plugin
        # can change either in between (swap a host-made socket in by dup2, flip the family in
        # memory). Every connect() is decided here, on the host's own copies.
        family = struct.unpack_from("=H", raw)[0] if len(raw) >= 2 else -1
        if family == AF_UNSPEC:  # a disconnect would free a host-made socket to be re-aimed
            return errno.EACCES, None, None
        if family not in (socket.AF_INET, socket.AF_INET6):
            # unix sockets and the rest: with a narrowed network there is nothing to reach
            return (errno.EACCES if family == socket.AF_UNIX else errno.EAFNOSUPPORT), None, None
        target, copy = self._target_socket(pidfd, tid, fd)
        if target is None:
            return errno.ENOTSOCK, copy, None
        if target.kind != socket.SOCK_STREAM or target.proto not in CARRIED_PROTOCOLS:
            # UDP, SCTP, raw...: what the worker's empty network namespace would answer
            return errno.ENETUNREACH, copy, None
        if family != target.family:
            return errno.EAFNOSUPPORT, copy, None
        if addr_len < MIN_ADDRESS[target.family] or len(raw) < MIN_ADDRESS[target.family]:
            return errno.EINVAL, copy, None  # what the kernel says to a short sockaddr
        try:
            address, port, sockaddr = _parse_sockaddr(family, raw)
        except (OverflowError, ValueError):  # a sockaddr the host's socket module refuses (flowinfo...)
            return errno.EINVAL, copy, None
        return 0, copy, (target, address, port, sockaddr)

    async def _connect(self, notif_id: int, fd: int, target: "_Target", address: str, port: int,
                       sockaddr: tuple) -> None:
        try:
            await self._make_connection(notif_id, fd, target, address, port, sockaddr)
        except (OverflowError, ValueError):  # a sockaddr the host's socket module refuses (flowinfo...)
            self._answer(notif_id, error=errno.EINVAL)
        except Exception:
            self._failed(f"connecting to {address}:{port} failed; refused")
            self._answer(notif_id, error=errno.EACCES)

    async def _make_connection(self, notif_id: int, fd: int, target: "_Target", address: str, port: int,
                               sockaddr: tuple) -> None:
        if not await self.policy.allows(address, port):
            self._deny(notif_id, address, port)
            return
        if not await self._room_for_another():
            self._refuse_over_limit(notif_id)
            return
        # Always plain TCP: an MPTCP socket would fall back to it anyway, and the host makes no
        # connection of another protocol.
        sock = socket.socket(target.family, socket.SOCK_STREAM, 0)
        self._connecting += 1
        try:
            sock.setblocking(False)
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            for level, option, value in target.options:  # what the plugin set before connecting
                sock.setsockopt(level, option, value)
            if target.nonblocking:  # the plugin polls for the result itself, as with its own socket
                error = sock.connect_ex(sockaddr)
                if error not in (0, errno.EINPROGRESS):
                    self._answer(notif_id, error=error)
                    return
            else:
                waited = await self._connect_while_waited_for(notif_id, sock, sockaddr)
                if waited is None:  # the plugin's connect() went away (a signal): nothing to install
                    return
                error = waited
                if error:
                    self._answer(notif_id, error=error)
                    return
                sock.setblocking(True)
            key = tcp_diag.key_of(sock, sockaddr)
            try:
                fcntl.ioctl(self._fd, IOCTL_ADDFD, ADDFD.pack(notif_id, ADDFD_FLAG_SETFD, sock.fileno(), fd,
                                                              target.fd_flags))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    self._answer(notif_id, error=errno.EACCES)
                return
            if self._fd >= 0:  # else the worker is gone, and its sockets were ended
                self._made[key.cookie] = key
            self.allowed += 1
            self._answer(notif_id, error=error)
        finally:
            self._connecting -= 1
            self._let_go(sock)  # installed, the plugin's other threads may have written to it and closed it

    async def _room_for_another(self) -> bool:
        """Whether the worker holds fewer than max_sockets of the host's (those being made included).
        At the bound, the kernel's table and the plugin's processes say which still exist: one census
        at a time, spaced by CENSUS_SPACING and by its own cost, and a connect() that comes meanwhile
        waits for the next one rather than being refused for sockets already closed."""
        while not (self._census_failed or self._has_room()):
            if self._census is not None and not self._census.done():
                await asyncio.shield(self._census)
            elif (delay := self._next_census - time.monotonic()) > 0:
                await asyncio.sleep(delay)
                continue
            else:
                self._next_census = time.monotonic() + CENSUS_SPACING
                self._census = asyncio.ensure_future(self._take_census())
                await asyncio.shield(self._census)
            return self._census_failed or self._has_room()
        return True

    def _has_room(self) -> bool:
        return len(self._made) + self._connecting < self._max_sockets

    async def _take_census(self) -> None:
        began = time.monotonic()
        try:
            alive = await asyncio.to_thread(_still_there, dict(self._made), self._processes)
        except OSError as exc:
            self._census_failed = True
            log.warning("plugin %s: the host cannot count the connections it made for it (%s): they are bounded "
                        "by its descriptors only from now on", self.plugin, exc.strerror or exc)
            return
        self._made = {cookie: key for cookie, key in self._made.items() if cookie in alive}
        ended = time.monotonic()
        self._next_census = ended + max(CENSUS_SPACING, CENSUS_SPACING_FACTOR * (ended - began))

    def _refuse_over_limit(self, notif_id: int) -> None:
        self.over_limit += 1
        if self.over_limit == 1:
            log.warning("plugin %s: connect refused (EMFILE): it holds %d connections the host made for it, its "
                        "nofile (config.json host.sandbox.rlimits.nofile); each counts until it is closed, however "
                        "it is held (a descriptor, a memory mapping, data left unsent). Later refusals are counted, "
                        "not logged", self.plugin, len(self._made))
        self._answer(notif_id, error=errno.EMFILE)

    async def _connect_while_waited_for(self, notif_id: int, sock: socket.socket, sockaddr: tuple) -> int | None:
        """Connect the host's socket, within CONNECT_TIMEOUT: 0, an errno, or None once the plugin's
        connect() call no longer waits (interrupted by a signal, its thread gone), so a plugin
        cannot leave the host holding sockets for calls it abandoned."""
        connecting = asyncio.ensure_future(self._loop.sock_connect(sock, sockaddr))
        deadline = self._loop.time() + CONNECT_TIMEOUT
        try:
            while True:
                left = deadline - self._loop.time()
                if left <= 0:
                    return errno.ETIMEDOUT
                done, _ = await asyncio.wait({connecting}, timeout=min(STILL_WAITING_EVERY, left))
                if done:
                    exc = connecting.exception()
                    if exc is None:
                        return 0
                    return getattr(exc, "errno", None) or errno.ECONNREFUSED
                if not self._still_waiting(notif_id):
                    return None
        finally:
            connecting.cancel()

    def _still_waiting(self, notif_id: int) -> bool:
        try:
            fcntl.ioctl(self._fd, IOCTL_ID_VALID, struct.pack("=Q", notif_id))
        except OSError:
            return False
        return True

    def _deny(self, notif_id: int, address: str, port: int) -> None:
        self.denied += 1
        self.last_denied = f"{address}:{port}"
        if (address, port) not in self._logged and len(self._logged) < MAX_LOGGED_DENIALS:
            self._logged.add((address, port))
            unanswered = self.policy.unanswered(port)
            if unanswered:  # it may well be theirs: "not granted" would send the operator the wrong way
                log.warning("plugin %s: connect to %s:%d denied: not among the addresses known for its grant, and "
                            "granted names could not be resolved just now: %s", self.plugin, address, port,
                            ", ".join(unanswered))
            elif self.policy.internal_on_a_granted_port(address, port):  # "any host:P" granted, and denied
                log.warning("plugin %s: connect to %s:%d denied: an address of this host's own (or link-local, or "
                            "unspecified), which a \"ports\" grant (any host:%d) never reaches; to allow it, add "
                            "\"%s:%d\" to config.json host.plugins.%s.permissions.network.hosts",
                            self.plugin, address, port, port, address, port, self.plugin)
            else:
                # the address, as the kernel has it: the name the plugin asked for, if any, is the better
                # grant ("HOST:%d" was no line to paste: newcomer pass 58)
                log.warning("plugin %s: connect to %s:%d denied: not among its network grant (%s); to allow it, "
                            "add \"%s:%d\" (or the name the plugin connects to, with that port) to config.json "
                            "host.plugins.%s.permissions.network.hosts",
                            self.plugin, address, port, self.policy.describe() or "nothing", address, port,
                            self.plugin)
        self._answer(notif_id, error=errno.EACCES)

    def denied_in_worker(self, count: int, destinations: list[str],
                         redact: Callable[[str], str] | None = None) -> None:
        """Connects the worker's audit hook refused before asking (an address surely outside the
        grant: the plugin's error names what to grant): counted and logged as this gate's own. A
        name may be a secret of the plugin's config (a database host): `redact` takes it out."""
        self.denied += count
        for destination in destinations:
            where = quotable(destination, redact)
            if where is None:
                continue
            self.last_denied = where
            if (where, -1) in self._logged or len(self._logged) >= MAX_LOGGED_DENIALS:
                continue
            self._logged.add((where, -1))
            log.warning("plugin %s: connect to %s denied (by its worker's own check): not among its network grant "
                        "(%s); to allow it, add \"%s\" to config.json host.plugins.%s.permissions.network.hosts",
                        self.plugin, where, self.policy.describe() or "nothing", where, self.plugin)

    def _answer(self, notif_id: int, flags: int = 0, error: int = 0) -> None:
        if self._fd < 0:
            return
        try:
            fcntl.ioctl(self._fd, IOCTL_SEND, bytearray(RESPONSE.pack(notif_id, 0, -error, flags)), True)
        except OSError:
            pass  # the caller died (ENOENT) or the worker is gone

    def _target_socket(self, worker_pidfd: int, tid: int, fd: int) -> "tuple[_Target | None, socket.socket | None]":
        """What the plugin's socket is and how it was set up (None for what is not a socket), and the
        host's copy of it, which the caller lets go of on the loop (_let_go)."""
        tgid = self._pid if tid == self._pid else _tgid(tid)
        try:
            pidfd = worker_pidfd if tgid == self._pid else os.pidfd_open(tgid)
            try:
                copy = _pidfd_getfd(pidfd, fd)
            finally:
                if pidfd != worker_pidfd:
                    os.close(pidfd)
        except OSError:
            return None, None
        try:
            sock = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)  # not a socket: nothing that could linger
            return None, None
        try:
            nonblocking = bool(fcntl.fcntl(copy, fcntl.F_GETFL) & os.O_NONBLOCK)
            options = []
            if sock.type == socket.SOCK_STREAM:
                options = [(level, option, sock.getsockopt(level, option)) for level, option in COPIED_OPTIONS]
            return _Target(sock.family, sock.type, sock.proto, nonblocking, _fd_flags(tgid, fd), options), sock
        except OSError:
            return None, sock

    def _let_go(self, sock: socket.socket) -> None:
        """Close the host's descriptor of a socket the plugin holds too, never on the event loop: if
        the plugin closes its own first, this close is the last, and what it frees is freed by the
        closing thread. A connection the host made, with SO_LINGER and data unsent to a peer that
        reads nothing, waits out its linger there: the socket itself (attack pass 36: the loop froze
        30 s), or one the plugin left queued in a socketpair whose last end this is (attack pass 40).
        Past LINGER_BOUND it is ended: by its cookie, or, not knowing which, every connection the
        host made for the plugin that none of its processes holds any more."""
        try:
            cookie = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, tcp_diag.SO_COOKIE, 8))[0]
        except OSError:
            cookie = -1
        key = self._made.get(cookie)
        closing = self._loop.run_in_executor(_CLOSER, os.close, sock.detach())
        bound = self._loop.call_later(LINGER_BOUND, self._end_lingering, closing, key)

        def closed(done: asyncio.Future) -> None:
            bound.cancel()
            done.exception()  # retrieved: a failed close (EBADF cannot happen) is nobody's to see
        closing.add_done_callback(closed)

    def _end_lingering(self, closing: asyncio.Future, key: tcp_diag.SocketKey | None) -> None:
        if closing.done():
            return
        log.warning("plugin %s: a connection the host made for it lingered past %g s after the plugin closed "
                    "it (SO_LINGER, a peer that reads nothing): ended", self.plugin, LINGER_BOUND)
        # not on the closers' threads, which lingering closes may all hold
        ending = self._loop.run_in_executor(None, _reset_lingering, dict(self._made), self._processes, key,
                                            self.plugin)
        ending.add_done_callback(lambda done: done.exception())


def _reset_lingering(made: dict[int, tcp_diag.SocketKey], processes: Callable[[], list[int]],
                     key: tcp_diag.SocketKey | None, plugin: str) -> None:
    """On a thread: end `key`, or every connection in `made` still in the kernel's table that none
    of the plugin's processes holds (closed by the plugin, draining or lingering)."""
    try:
        if key is not None:
            keys = [key]
        else:
            in_table, held = tcp_diag.live_cookies(), tcp_diag.held_inodes(processes())
            keys = [k for cookie, k in made.items() if cookie in in_table and k.inode not in held]
        for each in keys:
            tcp_diag.destroy(each)
    except OSError as exc:
        log.warning("plugin %s: ending a lingering connection failed: %s", plugin, exc)


def _still_there(made: dict[int, tcp_diag.SocketKey], processes: Callable[[], list[int]]) -> set[int]:
    """The cookies of the sockets in `made` that still hold memory: in the kernel's table (open,
    closing, an orphan with data unsent), or held by one of the plugin's processes (a socket closed
    both ways leaves the table, not memory, while a descriptor or a mapping of it is left)."""
    in_table = tcp_diag.live_cookies()
    held = tcp_diag.held_inodes(processes())
    return {cookie for cookie, key in made.items() if cookie in in_table or key.inode in held}


class _Target(NamedTuple):
    family: int
    kind: int
    proto: int
    nonblocking: bool
    fd_flags: int  # O_CLOEXEC or 0, for the installed descriptor
    options: list[tuple[int, int, int]]


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    copy = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copy < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"pidfd_getfd: {os.strerror(code)}")
    return copy


def _read_memory(tid: int, address: int, size: int) -> bytes:
    fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def _tgid(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:  # bytes: its Name line is the plugin's to set
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _fd_flags(tgid: int, fd: int) -> int:
    """O_CLOEXEC as the plugin's own descriptor had it: a granted subprocess may inherit it."""
    try:
        with open(f"/proc/{tgid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_CLOEXEC
    except (OSError, ValueError):
        pass
    return os.O_CLOEXEC


def _parse_sockaddr(family: int, raw: bytes) -> tuple[str, int, tuple]:
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        text = socket.inet_ntop(socket.AF_INET, raw[4:8])
        return text, port, (text, port)
    flowinfo, = struct.unpack_from("!I", raw, 4)
    text = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    scope, = struct.unpack_from("=I", raw, 24) if len(raw) >= 28 else (0,)
    return literal_address(text) or text, port, (text, port, flowinfo, scope)
