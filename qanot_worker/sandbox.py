"""The kernel sandbox a worker puts itself in before it imports any plugin code.

Order matters (see shared notes): rlimits and the pids cgroup, the connect() listener when the
network is narrowed to hosts, then a new network namespace (needs privilege, so before anything
drops it), then an unprivileged uid, no_new_privs, Landlock, and
seccomp last. Each layer that the kernel or the
process's privileges do not allow is reported, never silently skipped; with `strict` a missing layer
refuses the plugin.

The kernel enforces. An audit hook only explains: when plugin code opens a path, connects or starts
a process that its grant does not cover, the error names the permission to grant, instead of a bare
"Permission denied".
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
import os
import resource
import socket
import sys
from typing import Any

from . import protocol as p
from .seccomp import install_connect_listener, install_seccomp

__all__ = ["apply_sandbox", "SandboxRefused", "SandboxOutcome", "landlock_abi", "in_cgroup"]

# Landlock: the same syscall numbers on every architecture (they are in the generic table).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH, LANDLOCK_RULE_NET_PORT = 1, 2
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_WRITE_ONLY = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_KEEPCAPS = 8
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2
CLONE_NEWNET = 0x40000000

RLIMITS = {"data": resource.RLIMIT_DATA, "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
           "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE, "cpu": resource.RLIMIT_CPU}

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxRefused(Exception):
    """strict was asked for and a layer could not be had."""


@dataclass
class SandboxOutcome:
    layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: str = ""  # strict and a layer missing: the plugin must not be loaded
    milliseconds: float = 0.0  # what entering the sandbox cost
    cgroup_to_verify: str = ""  # joined by the fork server: checked on Load, before plugin code
    strict: bool = False
    egress_fd: int = -1  # the connect() listener, held until the host has taken its own copy

    def release_egress_listener(self) -> None:
        """On Load: the host holds the listener by now; plugin code must never answer its own connects."""
        fd, self.egress_fd = self.egress_fd, -1
        if fd >= 0:
            os.close(fd)

    def verify_cgroup(self) -> None:
        """On Load: the fork server has answered Spawned by now, so the worker must be in its group."""
        procs, self.cgroup_to_verify = self.cgroup_to_verify, ""
        if not procs:
            return
        if in_cgroup(procs):
            self.layers.append("pids-cgroup")
            return
        message = f"sandbox layer pids-cgroup is not active: the fork server could not add the worker to {procs}"
        if self.strict:
            self.refused = message
        else:
            self.warnings.append(message)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none."""
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def apply_sandbox(spec: p.SandboxSpec, plugin: str) -> tuple[list[str], list[str], int]:
    """Apply every layer `spec` asks for; returns (active layers, warnings, egress listener fd or -1)."""
    active, warnings = [], []
    egress_fd = -1

    def layer(name: str, ok: bool, why: str = "") -> None:
        if ok:
            active.append(name)
            return
        message = f"sandbox layer {name} is not active: {why}"
        if spec.strict:
            raise SandboxRefused(message)
        warnings.append(message)

    _set_rlimits(spec.rlimits)
    layer("rlimits", True)
    if not spec.cgroup_joined_by_parent:  # else verified on Load, once the parent has done it
        layer("pids-cgroup", *_join_cgroup(spec.cgroup_procs))
    narrowed_to_hosts = spec.network and bool(spec.tcp_hosts)
    if narrowed_to_hosts:
        # First, so that without it the worker keeps its network, narrowed to the grant's ports only.
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # what an unprivileged seccomp filter needs
        egress_fd, why = install_connect_listener()
        narrowed_to_hosts = egress_fd >= 0
        layer("egress-filter", narrowed_to_hosts, f"{why}; the network grant holds for its ports, any host")
    if not spec.network or narrowed_to_hosts:  # with hosts, every way out is a socket the host made
        layer("network-namespace", *_new_network_namespace())
    if spec.uid >= 0:  # after everything that needs root, before no_new_privs
        layer("identity", *_drop_identity(spec.uid, spec.gid))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        layer("no-new-privileges", True)
    else:
        layer("no-new-privileges", False, os.strerror(ctypes.get_errno()))
    layer("landlock", *_landlock(spec))
    layer("seccomp", *install_seccomp(spec.subprocess))
    _explain_denials(spec, plugin)
    return active, warnings, egress_fd


def _set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        which = RLIMITS[name]
        soft, hard = resource.getrlimit(which)
        # An unprivileged process cannot raise a hard limit: only ever lower it.
        new = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (new, new))


def _join_cgroup(procs: str) -> tuple[bool, str]:
    if not procs:
        return False, "the host could not create a pids cgroup (no cgroup pids controller, or no privilege)"
    try:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        return False, f"joining {procs} failed: {exc.strerror}"
    return True, ""


def in_cgroup(procs: str) -> bool:
    """Is this process in the cgroup whose cgroup.procs file is `procs`?"""
    group = os.path.dirname(procs)
    try:
        with open("/proc/self/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2)[2] for line in f if line.count(":") >= 2]
    except OSError:
        return False
    return any(path != "/" and group.endswith(path) for path in memberships)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_identity(uid: int, gid: int) -> tuple[bool, str]:
    """Become an unprivileged user, keeping only CAP_DAC_READ_SEARCH.

    That one capability lets the worker read its interpreter wherever it is installed (here under
    /root, mode 0700); Landlock still decides which paths it may read. Writing needs the uid's own
    rights: the host makes the data directory the plugin's.
    """
    try:
        _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        return False, f"setresuid({uid}) failed: {exc.strerror}"
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if _libc.capset(ctypes.byref(header), data) != 0:
        return False, f"capset failed: {os.strerror(ctypes.get_errno())}"
    _libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    return True, f"uid {uid}"


def _new_network_namespace() -> tuple[bool, str]:
    if _libc.unshare(CLONE_NEWNET) == 0:
        return True, ""
    return False, f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"


def _landlock(spec: p.SandboxSpec) -> tuple[bool, str]:
    abi = landlock_abi()
    if abi < 1:
        return False, "the kernel has no Landlock"
    fs = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_READ_DIR | FS_WRITE_ONLY
    fs |= (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 and not (spec.network and spec.tcp_ports is None) else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        return False, f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    try:
        read = FS_READ_FILE | FS_READ_DIR
        for paths, access in ((spec.read_paths, read), (spec.exec_paths, read | FS_EXECUTE),
                              (spec.write_paths, fs & ~FS_EXECUTE)):
            for path in paths:
                _allow_path(ruleset, path, access)
        if net and spec.network:
            for port in {*(spec.tcp_ports or ()), *(port for _, port in spec.tcp_hosts)}:
                rule = _NetPortAttr(NET_CONNECT_TCP, port)
                _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_NET_PORT, ctypes.byref(rule), 0)
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return False, f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return True, f"ABI {abi}"


def _allow_path(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist here grants nothing
    try:
        if not os.path.isdir(path):
            # Directory-only rights on a file make add_rule fail with EINVAL.
            access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
        rule = _PathBeneathAttr(access, fd)
        _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
    finally:
        os.close(fd)


def _explain_denials(spec: p.SandboxSpec, plugin: str) -> None:
    """An audit hook that turns a denied open/connect/exec into an error naming the permission."""
    readable = tuple(os.path.join(os.path.realpath(x), "") for x in
                     [*spec.read_paths, *spec.exec_paths, *spec.write_paths])
    writable = tuple(os.path.join(os.path.realpath(x), "") for x in spec.write_paths)
    grant = f"config.json: host.plugins.{plugin}.permissions"

    narrowed = spec.network and spec.tcp_ports is not None
    any_host_ports = set(spec.tcp_ports or ())
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
        return not name or (name, port) in granted_pairs or _is_ip_literal(name)

    def covered(path: str, roots: tuple[str, ...]) -> bool:
        real = os.path.join(os.path.realpath(path), "")
        return real.startswith(roots)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            mode = args[1] or "r"
            wants_write = any(c in str(mode) for c in "wax+") or (isinstance(args[2], int) and args[2] & 3)
            if not covered(path, writable if wants_write else readable):
                raise PermissionError(errno.EACCES, f"denied by the sandbox: {'writing' if wants_write else 'reading'} "
                                      f"{path} needs the 'filesystem' permission ({grant})")
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            if not covered(path, readable):
                raise PermissionError(errno.EACCES, f"denied by the sandbox: listing {path} needs the "
                                      f"'filesystem' permission ({grant})")
        elif event == "socket.connect" and not spec.network and _is_inet(args[0]):
            raise PermissionError(errno.EACCES, f"denied by the sandbox: connecting to {args[1]} needs the "
                                  f"'network' permission ({grant})")
        elif event in ("socket.connect", "socket.getaddrinfo") and narrowed:
            address = args[1] if event == "socket.connect" else args[:2]
            if (event == "socket.getaddrinfo" or _is_inet(args[0])) and not reachable(address):
                host, port = address[0], address[1]
                raise PermissionError(errno.EACCES, f"denied by the sandbox: {host}:{port} is not among the "
                                      f"'network' hosts and ports granted ({grant}.network: add "
                                      f"\"{host}:{port}\" to its \"hosts\")")
        elif event == "socket.bind" and not spec.network and _is_inet(args[0]):
            raise PermissionError(errno.EACCES, f"denied by the sandbox: binding {args[1]} needs the "
                                  f"'network' permission ({grant})")
        elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                       "os.fork", "os.forkpty") and not spec.subprocess:
            raise PermissionError(errno.EACCES, f"denied by the sandbox: starting a process needs the "
                                  f"'subprocess' permission ({grant})")

    sys.addaudithook(hook)


def _is_inet(sock: object) -> bool:
    return isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6)


def _is_ip_literal(name: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, name.strip("[]").split("%")[0])
            return True
        except OSError:
            pass
    return False
