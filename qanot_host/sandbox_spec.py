"""What a plugin's worker may touch, from the operator's grant: the host decides, the worker
enforces (qanot_worker/sandbox.py) before it imports any plugin code."""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib

from qanot_worker import protocol as p

from .config import Config, NetworkGrant, Permissions

__all__ = ["sandbox_spec", "withheld_permissions", "plugin_uid", "give_data_dir", "probe_layers"]

# What any Python process needs to read: shared libraries, time zones, and its own /proc entry.
# Never all of /proc: measured here, a root worker under Landlock could still read
# /proc/<parent>/environ (the host's secrets) when /proc as a whole was readable.
SYSTEM_READ = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/usr/share/zoneinfo",
               "/etc/localtime", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat",
               "/dev/urandom", "/dev/random", "/dev/zero"]
SYSTEM_WRITE = ["/dev/null"]
# What name resolution and TLS need, granted with network.
NETWORK_READ = ["/etc/ssl", "/etc/ca-certificates", "/usr/share/ca-certificates", "/etc/resolv.conf",
                "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf", "/etc/services",
                "/etc/protocols"]
EXEC_DIRS = ["/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin"]


def _python_paths(import_root: str) -> list[str]:
    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             os.path.join(sys.base_prefix, "lib"), import_root}
    for entry in os.listdir(import_root):
        paths.add(os.path.realpath(os.path.join(import_root, entry)))
    return sorted(paths)


def sandbox_spec(config: Config, plugin: str, plugin_dir: str, site_dirs: list[str], data_dir: str,
                 import_root: str, cgroup_procs: str = "") -> p.SandboxSpec | None:
    settings = config.host.sandbox
    if not settings.enabled:
        return None
    grant: Permissions = config.settings_for(plugin).permissions
    network = bool(grant.network or grant.database)
    ports, hosts = _ports(grant), _hosts(grant)
    read = [*_python_paths(import_root), *SYSTEM_READ, plugin_dir, *site_dirs]
    if network:
        read += NETWORK_READ
    write = [data_dir, *SYSTEM_WRITE]
    if grant.filesystem is not None:
        read += grant.filesystem.read
        write += grant.filesystem.write
    executable_dir = os.path.dirname(os.path.realpath(sys.executable))
    uid = plugin_uid(settings.uid_base, plugin) if settings.identity and os.geteuid() == 0 else -1
    return p.SandboxSpec(
        read_paths=read, write_paths=write,
        exec_paths=[*EXEC_DIRS, executable_dir] if grant.subprocess else [],
        network=network, tcp_ports=ports, tcp_hosts=hosts if ports is not None else [],
        subprocess=grant.subprocess,
        rlimits=dict(settings.rlimits), cgroup_procs=cgroup_procs, strict=settings.strict,
        uid=uid, gid=uid)


def plugin_uid(base: int, plugin: str) -> int:
    """A uid of the plugin's own, the same at every start (its data directory stays its own)."""
    return base + zlib.crc32(plugin.encode()) % 4000


def give_data_dir(data_dir: str, uid: int) -> None:
    """Make the plugin's data directory (and what is in it) belong to its uid."""
    for root, dirs, files in os.walk(data_dir):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            try:
                if os.lstat(name).st_uid != uid:
                    os.lchown(name, uid, uid)
            except OSError:
                pass


def _ports(grant: Permissions) -> list[int] | None:
    """None: any port. A bare `true` for either network or database means any port."""
    if grant.network is True or grant.database is True:
        return None
    return sorted({port for item in _narrowed(grant) for port in item.ports})


def _hosts(grant: Permissions) -> list[tuple[str, int]]:
    return sorted({pair for item in _narrowed(grant) for pair in item.pairs()})


def _narrowed(grant: Permissions) -> list[NetworkGrant]:
    """network and database grants given as lists rather than a bare true."""
    return [item for item in (grant.network, grant.database) if isinstance(item, NetworkGrant)]


def withheld_permissions(declared: list[str], grant: Permissions) -> list[str]:
    """What plugin.json asks for that config.json does not grant."""
    granted = grant.granted()
    return [name for name in declared if name not in granted]


def probe_layers() -> list[tuple[str, bool, str]]:
    """What this machine allows, layer by layer, found without starting a worker: (layer,
    available, detail). A forked child tries the layers that change the process itself."""
    from qanot_worker.sandbox import landlock_abi
    abi = landlock_abi()
    probes = [("environment", True, "scrubbed"), ("python-isolation", True, "python -I -S"),
              ("rlimits", True, ""), ("landlock", abi >= 1, f"ABI {abi}" if abi else "the kernel has no Landlock")]
    pid = os.fork()
    if pid == 0:  # child: try what needs trying, report by exit status bits
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        bits = (libc.unshare(0x40000000) == 0) | ((libc.prctl(38, 1, 0, 0, 0) == 0) << 1)
        from qanot_worker.seccomp import install_connect_listener
        bits |= (install_connect_listener()[0] >= 0 and hasattr(os, "pidfd_open")) << 2
        os._exit(bits)
    bits = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    probes.append(("network-namespace", bool(bits & 1), "" if bits & 1 else "unshare(CLONE_NEWNET) refused "
                   "(not root, no user namespaces): Landlock TCP rules still deny TCP"))
    probes.append(("no-new-privileges", bool(bits & 2), "" if bits & 2 else "prctl refused"))
    probes.append(("egress-filter", bool(bits & 4), "network narrowed to host:port pairs: the host makes each "
                   "connection" if bits & 4 else "no seccomp listener (x86_64, Linux 5.14 or newer): a "
                   "network grant with hosts holds for its ports, any host"))
    import platform
    probes.append(("seccomp", platform.machine() == "x86_64", "" if platform.machine() == "x86_64"
                   else f"no syscall table for {platform.machine()} yet"))
    cgroups = os.path.isdir("/sys/fs/cgroup/pids") or os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    writable = cgroups and os.access("/sys/fs/cgroup/pids" if os.path.isdir("/sys/fs/cgroup/pids")
                                     else "/sys/fs/cgroup", os.W_OK)
    probes.append(("pids-cgroup", bool(writable), "" if writable else "no writable pids cgroup controller"))
    root = os.geteuid() == 0
    probes.append(("identity", root, "a uid per plugin" if root else "the host is not root: workers already "
                   "run as the host's unprivileged user"))
    return probes
