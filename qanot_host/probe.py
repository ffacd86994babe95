"""What this machine allows, layer by layer, found without starting a worker (`qanot-host check`).

The host probes with code of its own (never the worker's): what needs trying is tried in a forked
child, which reports by its exit status. The layer names are the ones workers report in `status`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from .cgroups import CGROUP_LAYERS, Cgroups
from .disks import DiskImages

__all__ = ["probe_layers"]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
SYS_LANDLOCK_CREATE_RULESET, SYS_SECCOMP = 444, 317
PR_SET_NO_NEW_PRIVS = 38

_BITS = {"pid-namespace": 1, "mount-namespace": 2, "ipc-namespace": 4, "uts-namespace": 8,
         "network-namespace": 16, "no-new-privileges": 32, "egress-filter": 64}


def probe_layers(state_dir: str) -> list[tuple[str, bool, str]]:
    """(layer, available, detail), in the order a worker enters them."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    tried = _try_in_child(libc)
    abi = max(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1)), 0)
    cgroups = Cgroups()
    disks = DiskImages(state_dir)
    needs_root = "needs root (or a kernel that refuses it)"
    probes = [("environment", True, "scrubbed"), ("python-isolation", True, "python -I -S"), ("rlimits", True, "")]
    for name in ("pid-namespace", "mount-namespace", "ipc-namespace", "uts-namespace"):
        ok = root and name in tried
        probes.append((name, ok, "a root of its own: only what its grant binds exists" if ok and name ==
                       "mount-namespace" else "" if ok else needs_root))
    probes.append(("network-namespace", "network-namespace" in tried,
                   "" if "network-namespace" in tried else "unshare(CLONE_NEWNET) refused: Landlock still denies TCP"))
    for layer in CGROUP_LAYERS:
        probes.append((layer, cgroups.available, "" if cgroups.available else cgroups.problem))
    probes.append(("disk-quota", root and disks.available, disks.problem or ("" if root else needs_root)))
    probes.append(("egress-filter", "egress-filter" in tried,
                   "network narrowed to hosts and ports: the host makes each connection" if "egress-filter" in tried
                   else "no seccomp listener (x86_64, Linux 5.14 or newer): a narrowed network grant cannot be "
                        "enforced"))
    probes.append(("identity", root, "a uid per plugin" if root else "the host is not root: workers run as the "
                   "host's own unprivileged user"))
    probes.append(("no-new-privileges", "no-new-privileges" in tried, ""))
    probes.append(("landlock", abi >= 1, f"ABI {abi}" if abi else "the kernel has no Landlock"))
    x86 = platform.machine() == "x86_64"
    probes.append(("seccomp", x86, "" if x86 else f"no syscall table for {platform.machine()} yet"))
    return probes


def _try_in_child(libc: ctypes.CDLL) -> set[str]:
    pid = os.fork()
    if pid == 0:
        bits = 0
        for name, flag in (("pid-namespace", CLONE_NEWPID), ("mount-namespace", CLONE_NEWNS),
                           ("ipc-namespace", CLONE_NEWIPC), ("uts-namespace", CLONE_NEWUTS),
                           ("network-namespace", CLONE_NEWNET)):
            if libc.unshare(flag) == 0:
                bits |= _BITS[name]
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            bits |= _BITS["no-new-privileges"]
            if _listener_works(libc) and hasattr(os, "pidfd_open"):
                bits |= _BITS["egress-filter"]
        os._exit(bits)
    bits = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return {name for name, bit in _BITS.items() if bits & bit}


def _listener_works(libc: ctypes.CDLL) -> bool:
    """A one-instruction filter (allow everything) with a notification listener: Linux 5.0 on."""
    if platform.machine() != "x86_64":
        return False
    program = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)  # RET ALLOW
    buf = ctypes.create_string_buffer(program, len(program))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(1, ctypes.cast(buf, ctypes.c_void_p))
    return libc.syscall(SYS_SECCOMP, 1, 1 << 3, ctypes.byref(fprog)) >= 0  # SET_MODE_FILTER, NEW_LISTENER
