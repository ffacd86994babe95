"""The kernel's table of TCP sockets, asked over NETLINK_SOCK_DIAG: which of the sockets the egress
made for a plugin still exist, and, once its worker is gone, ending the ones that outlive it.

A plugin need not hold a descriptor to keep a socket: a memory mapping of it holds it (TCP sockets
may be mapped, for zero-copy receive), and a socket closed with data unsent lingers as an orphan for
as long as the peer keeps its window shut. So neither `nofile` nor the worker's exit bounds the
sockets the host made for it, whose buffers are the host's memory and whose ports are the host's.
The host knows each by the kernel's cookie for it (SO_COOKIE) and its inode, counts those still in
the table or still held by the plugin's processes (a closed socket leaves the table, not memory),
and destroys what is left when the worker is gone (SOCK_DESTROY, as `ss -K` does).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
from typing import NamedTuple

__all__ = ["SocketKey", "key_of", "live_cookies", "held_inodes", "destroy"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
SO_COOKIE = 57
TCP_TIME_WAIT = 6
# Every state but TIME_WAIT, which holds neither buffers nor a descriptor's worth of anything
LIVE_STATES = 0xFFF & ~(1 << TCP_TIME_WAIT)
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
REQUEST = struct.Struct("=BBBBI")  # struct inet_diag_req_v2, before its inet_diag_sockid
PORTS = struct.Struct("!HH")  # sport, dport (big-endian), then src[16] and dst[16]
TAIL = struct.Struct("=III")  # interface, cookie (two 32-bit halves, low first)
COOKIE_OFFSET = 4 + PORTS.size + 32 + 4  # in struct inet_diag_msg: after family..retrans, ports, addresses, if
NO_COOKIE = 0xFFFFFFFFFFFFFFFF
MAPPED_SOCKET = re.compile(rb" (\d+) +socket:\[")  # a line of /proc/PID/maps: ... inode path


class SocketKey(NamedTuple):
    family: int
    local: bytes  # 16 bytes, an IPv4 address in the first 4
    local_port: int
    remote: bytes
    remote_port: int
    cookie: int
    inode: int  # its file's, as a process that holds it shows it (socket:[inode])


def key_of(sock: socket.socket, remote: tuple) -> SocketKey:
    """A connected (or connecting) socket's key: its ends and the kernel's cookie for it."""
    local = sock.getsockname()
    cookie = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return SocketKey(sock.family, _packed(sock.family, local[0]), local[1], _packed(sock.family, remote[0]),
                     remote[1], cookie, os.fstat(sock.fileno()).st_ino)


def live_cookies() -> set[int]:
    """The cookies of every TCP socket of this network namespace, IPv4 and IPv6, but TIME_WAIT's.
    OSError where the kernel does not answer (no sock_diag)."""
    found: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        request = REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, LIVE_STATES) + bytes(PORTS.size + 32) \
            + _tail(NO_COOKIE)
        with _netlink() as nl:
            nl.send(HEADER.pack(HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                    + request)
            while not _read_dump(nl.recv(1 << 20), found):
                pass
    return found


def held_inodes(pids: list[int]) -> set[int]:
    """The inodes of the sockets these processes hold, by a descriptor (of any thread: one cloned
    without CLONE_FILES has a table of its own) or a memory mapping. A socket that has reached CLOSE
    leaves the kernel's table, but not memory, while something holds it."""
    found: set[int] = set()
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        tables = [f"/proc/{pid}/task/{tid}/fd" for tid in tasks]
        for table in tables:
            try:
                names = os.listdir(table)
            except OSError:
                continue
            for fd in names:
                try:
                    target = os.readlink(f"{table}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
        try:
            with open(f"/proc/{pid}/maps", "rb") as maps:
                found.update(int(inode) for inode in MAPPED_SOCKET.findall(maps.read()))
        except OSError:
            continue
    return found


def destroy(key: SocketKey) -> bool:
    """End the socket if it is still the one `key` names (its cookie decides: a port used again by
    another socket is never touched). False where the kernel cannot (no CONFIG_INET_DIAG_DESTROY,
    or no CAP_NET_ADMIN); True otherwise, also when it was gone already."""
    request = (REQUEST.pack(key.family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
               + PORTS.pack(key.local_port, key.remote_port) + key.local + key.remote + _tail(key.cookie))
    with _netlink() as nl:
        nl.send(HEADER.pack(HEADER.size + len(request), SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + request)
        reply = nl.recv(65536)
    if len(reply) < HEADER.size + 4 or HEADER.unpack_from(reply)[1] != NLMSG_ERROR:
        return True
    code = -struct.unpack_from("=i", reply, HEADER.size)[0]
    if code in (0, errno.ENOENT):
        return True
    if code in (errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
        return False
    raise OSError(code, f"SOCK_DESTROY: {os.strerror(code)}")


def _read_dump(data: bytes, found: set[int]) -> bool:
    """Add the cookies in one read of a dump; True once the dump is done."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _, _, _ = HEADER.unpack_from(data, offset)
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, offset + HEADER.size)[0]
            raise OSError(code, f"sock_diag: {os.strerror(code)}")
        if kind == SOCK_DIAG_BY_FAMILY:
            low, high = struct.unpack_from("=II", data, offset + HEADER.size + COOKIE_OFFSET)
            found.add(low | high << 32)
        offset += (length + 3) & ~3
    return False


def _tail(cookie: int) -> bytes:
    """The end of an inet_diag_sockid: no interface, and the cookie as the kernel keeps it."""
    return TAIL.pack(0, cookie & 0xFFFFFFFF, cookie >> 32)


def _netlink() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


def _packed(family: int, address: str) -> bytes:
    raw = socket.inet_pton(family, address.split("%", 1)[0])
    return raw + bytes(16 - len(raw))
