"""The kernel sandbox a worker puts itself in before it imports any plugin code: the layers, in the
order they must come, written down once.

1. rlimits
2. the connect() listener, when the network is narrowed to hosts and ports (the host answers)
3. namespaces and the worker's own root (namespaces.py): needs root, so before anything drops it
4. an unprivileged uid of the plugin's own, with no capabilities at all
5. no_new_privs
6. Landlock (landlock.py)
7. seccomp (seccomp.py), last: it would refuse what the layers above need
8. the audit hook that explains denials (explain.py)

The PID namespace and the cgroups come from the launcher, which forks the worker into them; they
are verified on Load, before plugin code. A layer the kernel or the process's privileges do not
allow is reported, never silently skipped; with `strict` a missing layer refuses the plugin.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
from dataclasses import dataclass, field

from . import linux
from . import protocol as p
from .explain import explain_denials
from .landlock import restrict
from .namespaces import NamespaceError, build_root, enter_namespaces
from .seccomp import install_connect_listener, install_seccomp

__all__ = ["apply_sandbox", "SandboxRefused", "SandboxOutcome", "in_cgroup"]

RLIMITS = {"data": resource.RLIMIT_DATA, "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
           "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE, "cpu": resource.RLIMIT_CPU}


class SandboxRefused(Exception):
    """strict was asked for and a layer could not be had, or a layer the machine has failed for this
    plugin (its disk)."""


@dataclass
class SandboxOutcome:
    layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: str = ""  # strict and a layer missing: the plugin must not be loaded
    milliseconds: float = 0.0  # what entering the sandbox cost
    cgroups_to_verify: dict[str, str] = field(default_factory=dict)  # placed by the launcher: checked at Hello
    strict: bool = False
    egress_fd: int = -1  # the connect() listener, held until the host has taken its own copy

    def release_egress_listener(self) -> None:
        """On Load: the host holds the listener by now; plugin code must never answer its own connects."""
        fd, self.egress_fd = self.egress_fd, -1
        if fd >= 0:
            os.close(fd)

    def verify_cgroups(self) -> None:
        """Before Hello: the launcher let the worker go on only once it was in its groups."""
        groups, self.cgroups_to_verify = self.cgroups_to_verify, {}
        for name, path in groups.items():
            if not name.endswith("-cgroup"):
                continue  # only counts (cpu-accounting): no ceiling of its own to report
            if path and in_cgroup(path):
                self.layers.append(name)
                continue
            why = f"the launcher could not add the worker to {path}" if path else \
                "the host could not make it (no such cgroup controller, or not root)"
            message = f"sandbox layer {name} is not active: {why}"
            if self.strict:
                self.refused = self.refused or message
            else:
                self.warnings.append(message)


def apply_sandbox(spec: p.SandboxSpec, plugin: str, disk: str = "") -> SandboxOutcome:
    """Enter every layer `spec` asks for. `disk`: "fd:N" (a detached mount for the data directory) or
    "error:why"."""
    outcome = SandboxOutcome(cgroups_to_verify=dict(spec.cgroups), strict=spec.strict)

    def layer(name: str, ok: bool, why: str = "") -> None:
        if ok:
            outcome.layers.append(name)
            return
        message = f"sandbox layer {name} is not active: {why}"
        if spec.strict:
            raise SandboxRefused(message)
        outcome.warnings.append(message)

    _set_rlimits(spec.rlimits)
    layer("rlimits", True)
    # TCP ports Landlock allows: None for any (the network granted whole), [] for none (no network,
    # or narrowed: the host makes each connection, so the worker itself may neither connect nor
    # bind a TCP socket, not even one the host made).
    tcp_ports: list[int] | None = None if spec.network and not spec.egress_filtered else []
    filtered = spec.egress_filtered
    if filtered:
        linux.libc.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # what an unprivileged filter needs
        outcome.egress_fd, why = install_connect_listener()
        if outcome.egress_fd < 0:  # the next best thing: its ports, on any host, by Landlock
            filtered = False
            tcp_ports = sorted({*spec.tcp_ports, *(port for _, port in spec.tcp_hosts)})
        layer("egress-filter", filtered, f"{why}; the grant holds for its ports only, on any host")
    outcome.warnings += _enter_world(spec, disk, layer, private_network=not spec.network or filtered)
    keeps_root = spec.uid < 0 and os.geteuid() == 0  # host.sandbox.identity false, as root
    if spec.uid >= 0:  # after everything that needs root, before no_new_privs
        layer("identity", *_drop_identity(spec.uid, spec.gid))
    elif keeps_root:  # no uid of its own, and no privilege either
        layer("capabilities-dropped", *_drop_capabilities())
        layer("identity", False, "host.sandbox.identity is false: the worker keeps uid 0, the host's own uid "
                                 "(its capabilities are dropped, but files and processes of uid 0 are its own)")
    layer("no-new-privileges", *_no_new_privs())
    layer("landlock", *restrict(spec, tcp_ports))
    layer("seccomp", *install_seccomp(spec.subprocess, shares_uid=keeps_root))
    explain_denials(spec, plugin)
    return outcome


def _memfd_noexec() -> tuple[bool, str]:
    try:
        with open("/proc/sys/vm/memfd_noexec") as f:
            value = f.read().strip()
    except OSError:
        return False, "this kernel has no vm.memfd_noexec (Linux 6.3 or later): a memfd it writes can be executed"
    return value == "2", f"vm.memfd_noexec is {value} in its PID namespace: a memfd it writes can be executed"


def _enter_world(spec: p.SandboxSpec, disk: str, layer, private_network: bool) -> list[str]:
    """Namespaces and the root; without a plan (no privilege for it), at least no network. A root
    that cannot be built is fatal, strict or not: the worker is half in its namespaces by then, and
    the rest of its sandbox was planned for the root it did not get."""
    layer("pid-namespace", os.getpid() == 2,
          spec.no_namespaces or "the launcher could not give the worker a PID namespace")
    if spec.subprocess:  # it may execve: what it writes into a memfd must not be a program
        layer("memfd-noexec", *_memfd_noexec())
    if not spec.mounts:
        layer("mount-namespace", False, spec.no_namespaces or "the host cannot make mount namespaces here (not root)")
        if private_network:
            ok = linux.libc.unshare(linux.CLONE_NEWNET) == 0
            layer("network-namespace", ok, f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
        return []
    if disk.startswith("failed:"):
        # Its image is there but would not attach: without it, its files would go to a plain directory
        # on the host's disk, with no ceiling, and the ones on its disk would seem gone. Strict or not.
        raise SandboxRefused(f"its disk could not be attached ({disk.removeprefix('failed:')}); it does not start "
                             "without it (limits.disk_mb 0 gives it a plain directory, with no ceiling)")
    disk_fd = int(disk[3:]) if disk.startswith("fd:") else -1
    try:
        enter_namespaces(network=not private_network)
        warnings = build_root(spec, disk_fd)
    except NamespaceError as exc:
        raise SandboxRefused(f"the plugin's root could not be built: {exc} (host.sandbox.namespaces: false "
                             "runs workers without one)") from None
    finally:
        if disk_fd >= 0:
            os.close(disk_fd)
    for name in ("mount-namespace", "ipc-namespace", "uts-namespace"):
        layer(name, True)
    if private_network:
        layer("network-namespace", True)
    if disk != "off" and any(op.kind == "data" for op in spec.mounts):
        layer("disk-quota", disk_fd >= 0, disk.removeprefix("error:") or "no disk for this plugin")
    return warnings


def _set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        which = RLIMITS[name]
        soft, hard = resource.getrlimit(which)
        # An unprivileged process cannot raise a hard limit: only ever lower it.
        new = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (new, new))


def _drop_identity(uid: int, gid: int) -> tuple[bool, str]:
    """Become the plugin's own unprivileged user: every capability goes with root. Its root holds
    only what it may read, on directories any user can traverse."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        return False, f"setresuid({uid}) failed: {exc.strerror}"
    if os.getpid() != 2:
        # No PID namespace whose init dies with the launcher: the change of credentials cleared
        # the parent-death signal, so arm it again (and make sure the parent is still there).
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(0)
    return True, f"uid {uid}"


def _drop_capabilities() -> tuple[bool, str]:
    """Root without a uid of its own: every capability goes (bounding set, ambient, then capset to
    none), so fanotify, raw sockets, chown, syslog and the like are refused as for any user."""
    for cap in range(64):
        if linux.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the kernel's last capability
    linux.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice: all none
    if linux.libc.syscall(SYS_CAPSET, header, data) != 0:
        return False, f"capset failed: {os.strerror(ctypes.get_errno())}"
    if os.getpid() != 2:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # as after a change of credentials
    return True, "none left"


PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_LINUX_CAPABILITY_VERSION_3, SYS_CAPSET = 0x20080522, 126


def _no_new_privs() -> tuple[bool, str]:
    if linux.libc.prctl(linux.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        return True, ""
    return False, os.strerror(ctypes.get_errno())


def in_cgroup(procs: str) -> bool:
    """Is this process in the cgroup whose cgroup.procs file is `procs`?"""
    group = os.path.dirname(procs)
    try:
        with open("/proc/self/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2)[2] for line in f if line.count(":") >= 2]
    except OSError:
        return False
    return any(path != "/" and group.endswith(path) for path in memberships)

