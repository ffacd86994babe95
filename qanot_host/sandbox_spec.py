"""What a plugin's worker may touch, from the operator's grant: the host decides, the worker
enforces (qanot_worker/sandbox.py) before it imports any plugin code.

The centre of it is the plan of the worker's own root (protocol.MountOp, in order): the system's
programs and libraries, the interpreter's standard library and the worker runtime, read-only; the
plugin's directory and environment, read-only; granted paths; its data directory, a private /tmp,
/dev and /proc; a few files of /etc. The host's site-packages are laid over with an empty directory
wherever a bind would bring them in. Anything not in the plan does not exist for the plugin.
"""

from __future__ import annotations

import functools
import glob
import os
import site
import sys
import sysconfig
import time

from qanot_worker import protocol as p

from .manifest import PERMISSIONS
from .mcp_servers import Programs
from .settings import Config, NetworkGrant, Permissions

__all__ = ["sandbox_spec", "withheld_permissions", "PluginPlaces", "unreachable", "python_paths"]

SYSTEM_TREES = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"]
SYSTEM_FILES = ["/etc/ld.so.cache", "/etc/localtime"]
# Where programs are kept (emptied in an MCP server's root but for its own: see _only_its_programs)
PROGRAM_DIRS = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/usr/libexec", "/usr/games", "/bin",
                "/sbin"]
# What name resolution and TLS need, granted with network.
NETWORK_FILES = ["/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/resolv.conf", "/etc/hosts",
                 "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf", "/etc/services", "/etc/protocols"]
DEVICE_WRITES = ["/dev/null", "/dev/zero", "/dev/full"]
# Without a root of its own (no mount namespace), what any Python process needs to read. Never all
# of /proc: measured here, a root worker under Landlock could still read /proc/<parent>/environ.
UNSHARED_SYSTEM_READ = ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/usr/share/zoneinfo",
                        "/etc/localtime", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat",
                        "/dev/urandom", "/dev/random", "/dev/zero"]


class PluginPlaces:
    """Where one plugin's things are, on the host (its worker sees them at the same paths)."""

    def __init__(self, plugin: str, plugin_dir: str, site_dirs: list[str], data_dir: str, import_root: str,
                 root_dir: str, workspace: tuple[str, str] | None = None, programs: Programs | None = None) -> None:
        self.plugin = plugin
        self.plugin_dir = plugin_dir
        self.site_dirs = site_dirs
        self.data_dir = data_dir
        self.import_root = import_root
        self.root_dir = root_dir  # an empty directory the worker mounts its new root on
        # workspace_dir/NAME, writable: (the path the plugin is told, the directory's real path)
        self.workspace = workspace
        # An MCP server's command: the programs it may execute (nothing else, unless subprocess is granted)
        self.programs = programs


def sandbox_spec(config: Config, places: PluginPlaces, uid: int, cgroups: dict[str, str],
                 namespaces: bool) -> p.SandboxSpec | None:
    settings = config.host.sandbox
    if not settings.enabled:
        return None
    grant: Permissions = config.settings_for(places.plugin).permissions
    network = bool(grant.network or grant.database)
    narrowed = [item for item in (grant.network, grant.database) if isinstance(item, NetworkGrant)]
    anywhere = grant.network is True or grant.database is True
    granted_reads = grant.filesystem.read if grant.filesystem is not None else []
    granted_writes = grant.filesystem.write if grant.filesystem is not None else []
    own = [*_python_paths(places.import_root), places.plugin_dir, *places.site_dirs]  # the host's and operator's
    programs = places.programs
    runs = grant.subprocess or programs is not None  # fork and execve (seccomp)
    if programs is not None:
        own += [*programs.readable, *programs.executable]
    reads = [*own, *granted_reads]
    no_namespaces = ""
    if namespaces:
        tmp_mb = config.limits_for(places.plugin).tmp_mb or 64
        mounts = _root_plan(places, own, granted_reads, granted_writes, network, grant.subprocess, uid, tmp_mb)
        visible = [op.target for op in mounts if op.kind in ("ro", "symlink")]
        reads = [*visible, "/etc/passwd", "/etc/group", "/proc", "/dev"]
        writes = [places.data_dir, *granted_writes, "/tmp", "/dev/shm", *DEVICE_WRITES,
                  *(places.workspace[:1] if places.workspace else [])]
    else:  # Landlock alone decides what of the host's file system the worker may touch
        mounts, visible = [], []
        no_namespaces = "host.sandbox.namespaces is false" if not settings.namespaces else \
            "the host is not root, so it cannot make them" if os.geteuid() != 0 else "this system has none"
        reads = [*reads, *UNSHARED_SYSTEM_READ, *(NETWORK_FILES if network else [])]
        if grant.subprocess:  # the programs it may run, their loader and libraries, and the interpreter
            reads += [path for path in SYSTEM_TREES if os.path.exists(path)]
            reads += _interpreter_paths()
        writes = [places.data_dir, *granted_writes, *DEVICE_WRITES, *(places.workspace[1:] if places.workspace else [])]
    # the agent reads the workspace place: no links there (granted directories are the operator's call)
    shared = (list(places.workspace[:1]) if namespaces else list(places.workspace[1:])) if places.workspace else []
    if grant.subprocess:  # any program of its root
        exec_paths = sorted({*visible, *reads} - {"/proc", "/dev"})
    else:  # an MCP server's own, or none
        exec_paths = sorted(programs.executable) if programs is not None else []
    return p.SandboxSpec(
        read_paths=sorted(set(reads)), write_paths=writes, link_free_paths=shared, exec_paths=exec_paths,
        mounts=mounts, no_namespaces=no_namespaces, root_dir=places.root_dir, cwd=places.data_dir,
        network=network,
        tcp_ports=[] if anywhere else sorted({port for item in narrowed for port in item.ports}),
        tcp_hosts=[] if anywhere else sorted({pair for item in narrowed for pair in item.pairs()}),
        subprocess=runs, rlimits=settings.rlimits.as_dict(), cgroups=cgroups, strict=settings.strict,
        uid=uid, gid=uid, host_private=_private_paths(config))


def _private_paths(config: Config) -> list[str]:
    """The host's config.json and state_dir, as written and resolved here, where they exist (in a
    worker's root they do not, so the worker could resolve nothing of them; it took 45 µs each, at
    every start, to find that out)."""
    paths = [os.path.abspath(x) for x in (config.path, config.host.state_dir) if x]
    return sorted({*paths, *(os.path.realpath(x) for x in paths)})


def _root_plan(places: PluginPlaces, reads: list[str], granted_reads: list[str], granted_writes: list[str],
               network: bool, subprocess: bool, uid: int, tmp_mb: int) -> list[p.MountOp]:
    """`reads` are the host's own paths (resolved here); granted paths go as the operator wrote them:
    resolving them here would follow whatever links a plugin that can write there has made, and
    the worker opens them without following any (a grant through a link is refused there)."""
    ops: dict[str, p.MountOp] = {}

    def add(op: p.MountOp) -> None:
        ops.setdefault(op.target, op)

    hidden = [path for path in host_site_dirs()]
    for op in _system_ops(network, tuple(_mount_points()), tuple(hidden)):
        add(op)
    if places.programs is not None and not subprocess:
        _only_its_programs(ops, places.programs)
    if subprocess:
        reads = [*reads, os.path.dirname(os.path.realpath(sys.executable))]
        for path in _venv_paths():  # at the same paths: the venv's python is a link, and reads pyvenv.cfg
            add(p.MountOp("ro", path, path))
    bound = [op.target for op in ops.values() if op.kind == "ro"]
    static = _real_python_paths(places.import_root)  # the host's own: resolved once
    reals = {*static.values(),
             *(os.path.realpath(path) for path in reads if path not in static and os.path.exists(path))}
    for real in sorted(reals):
        # Inside a tree bound already, a bind adds nothing, unless a hidden directory lies between.
        if not any(_under(real, tree) and not any(_under(real, h) and _under(h, tree) for h in hidden)
                   for tree in bound):
            add(p.MountOp("ro", real, real))
            bound.append(real)
    for path in granted_reads:
        add(p.MountOp("ro", path, path))
    for path in granted_writes:  # granted both ways: writable (it was bound read-only, EROFS: compat pass 57)
        ops[path] = p.MountOp("rw", path, path)
    if places.workspace:
        add(p.MountOp("rw", *places.workspace))
    for path in hidden:
        if any(_under(path, op.target) for op in ops.values() if op.kind == "ro"):
            add(p.MountOp("hide", path))
    add(p.MountOp("data", places.data_dir, places.data_dir))
    add(p.MountOp("tmpfs", "/tmp", size=tmp_mb * 2**20))
    add(p.MountOp("devices", "/dev", size=tmp_mb * 2**20))
    add(p.MountOp("proc", "/proc"))
    add(p.MountOp("file", "/etc/passwd", text=f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                                              f"qanot:x:{uid}:{uid}:qanot plugin:{places.data_dir}:/bin/sh\n"))
    add(p.MountOp("file", "/etc/group", text=f"root:x:0:\nqanot:x:{uid}:\n"))
    # Parents before children: a bind inside a tmpfs or another bind needs its mount point there.
    return sorted(ops.values(), key=lambda op: [c for c in op.target.split("/") if c])


@functools.lru_cache(maxsize=8)
def _system_ops(network: bool, mount_points: tuple[str, ...], hidden: tuple[str, ...]) -> list[p.MountOp]:
    """The system's programs, libraries and few files every root holds, read-only: the same for
    every plugin while the host's mounts stay as they are (hundreds of starts a second read them once)."""
    ops: dict[str, p.MountOp] = {}

    def add(op: p.MountOp) -> None:
        ops.setdefault(op.target, op)

    for path in SYSTEM_TREES:
        if os.path.islink(path):
            add(p.MountOp("symlink", path, text=os.readlink(path)))
        elif os.path.isdir(path):
            add(p.MountOp("ro", path, path))
            _add_mounts_beneath(add, path, path, list(mount_points), list(hidden))
    for path in [*SYSTEM_FILES, *(NETWORK_FILES if network else [])]:
        if os.path.exists(path):
            add(p.MountOp("ro", path, os.path.realpath(path)))
            _add_mounts_beneath(add, path, os.path.realpath(path), list(mount_points), list(hidden))
    return list(ops.values())


@functools.cache
def _real_python_paths(import_root: str) -> dict[str, str]:
    """The interpreter's and the runtime's paths (the host's, for its life), each with its real path."""
    return {path: os.path.realpath(path) for path in _python_paths(import_root) if os.path.exists(path)}


def _only_its_programs(ops: dict[str, p.MountOp], programs: Programs) -> None:
    """An MCP server may execute its own programs only (Landlock), but the ELF loader it needs can
    start any program it can read (`ld.so /bin/sh`): so the directories of programs are empty in its
    root, save its own (and the links on the way to them). Its writable places are noexec mounts,
    which the loader cannot map code from either."""
    for path in PROGRAM_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):  # /bin -> usr/bin: emptied there
            ops[path] = p.MountOp("hide", path)
    emptied = {os.path.realpath(path) for path in PROGRAM_DIRS}
    for hop in programs.hops:
        directory = os.path.realpath(os.path.dirname(hop))
        if directory in emptied:  # /bin/x is put back as /usr/bin/x where /bin is a link
            target = os.path.join(directory, os.path.basename(hop))  # bound from there too: the worker binds
            ops[target] = p.MountOp("symlink", target, text=os.readlink(hop)) if os.path.islink(hop) \
                else p.MountOp("ro", target, target)  # real paths only (/bin/dash failed: /bin is a link)


def _interpreter_paths() -> list[str]:
    """What running the host's interpreter takes: its directory, and in a virtual environment the
    environment's bin (where sys.executable is a link) and its pyvenv.cfg."""
    return [os.path.dirname(os.path.realpath(sys.executable)), *_venv_paths()]


@functools.cache
def _venv_paths() -> list[str]:
    if sys.prefix == sys.base_prefix:
        return []
    paths = [os.path.dirname(os.path.abspath(sys.executable)), os.path.join(sys.prefix, "pyvenv.cfg")]
    return [path for path in paths if os.path.exists(path)]


def _mount_points() -> list[str]:
    """Where the host's mount namespace has something mounted (/proc/self/mountinfo's fifth field),
    read again at most every MOUNTS_FRESH seconds: hundreds of plugins start within that."""
    now = time.monotonic()
    if now - _mounts_read[0] > MOUNTS_FRESH:
        _mounts_read[:] = [now, _read_mount_points()]
    return _mounts_read[1]


MOUNTS_FRESH = 2.0
_mounts_read: list = [-MOUNTS_FRESH - 1.0, []]


def _read_mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            fields = [line.split(" ") for line in info]
    except OSError:
        return []
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return [_unescape(parts[4]) for parts in fields if len(parts) > 4]


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _add_mounts_beneath(add, target: str, source: str, mount_points: list[str], hidden: list[str]) -> None:
    """A bind is not recursive (a recursive one would carry the mounts beneath with their own, maybe
    writable, flags), so what the host has mounted inside a system tree or file it shares (a CA bundle
    or /etc/hosts mounted over, as containers and Kubernetes do) is bound again, read-only, on top:
    the plugin sees the files the host sees."""
    for point in sorted(mount_points):
        if point != source and _under(point, source) and not any(_under(point, h) for h in hidden):
            if os.path.isdir(point) or os.path.isfile(point):
                add(p.MountOp("ro", target + point[len(source):], point))


def _under(path: str, tree: str) -> bool:
    return path.startswith(tree.rstrip("/") + "/")


@functools.cache  # the host's interpreter and runtime: the same for every plugin, for the host's life
def _python_paths(import_root: str) -> list[str]:
    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             os.path.join(sys.base_prefix, "lib"), import_root}
    for entry in os.listdir(import_root):
        paths.add(os.path.realpath(os.path.join(import_root, entry)))
    return sorted(paths)


@functools.cache
def host_site_dirs() -> list[str]:
    """Every directory of the host's own installed packages: none is the plugin's to read. A host
    in a virtual environment names only the environment's, but the base interpreter's lie in the
    library tree the workers are given (its lib/pythonX.Y/site-packages, Debian's dist-packages):
    the base's are covered too."""
    bases = sorted({sys.base_prefix, sys.base_exec_prefix})
    candidates = [*site.getsitepackages(), *site.getsitepackages(bases), site.getusersitepackages(),
                  *(path for path in sys.path if "site-packages" in path or "dist-packages" in path)]
    for base in bases:
        for pattern in ("python*/site-packages", "python*/dist-packages"):
            candidates += glob.glob(os.path.join(glob.escape(base), "lib*", pattern))
    return sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})


@functools.cache
def python_paths() -> list[str]:
    """The interpreter and its standard library, which a worker reads as it imports."""
    return sorted({os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"]})


def unreachable(paths: list[str], uid: int, whole_path: bool) -> str | None:
    """Why a process of `uid` (neither owner nor group of the host's files) cannot get at one of
    `paths` by the mode bits: a directory on the way it may not search, or the place itself it may
    not read. `whole_path`: without a root of its own the worker walks the host's own directories
    (with one, only the last is the host's). None if every one is within reach."""
    for path in paths:
        parts = os.path.realpath(path).split("/")
        walk = ["/".join(parts[:i]) or "/" for i in range(1, len(parts))] if whole_path else []
        for directory in walk:
            if not _allows(directory, uid, 0o1):
                return f"{directory} is not searchable by others (mode {_mode(directory)}), and the plugin " \
                       f"runs as a uid of its own ({uid}); it cannot reach {path}"
        if os.path.exists(path) and not _allows(path, uid, 0o4 | (0o1 if os.path.isdir(path) else 0)):
            return f"{path} is not readable by others (mode {_mode(path)}), and the plugin runs as a uid of " \
                   f"its own ({uid})"
    return None


def _allows(path: str, uid: int, bits: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return True  # not there: what follows says so better
    if st.st_uid == uid:
        return st.st_mode & (bits << 6) == bits << 6
    return st.st_mode & bits == bits


def _mode(path: str) -> str:
    try:
        return oct(os.stat(path).st_mode & 0o7777)
    except OSError:
        return "?"


def withheld_permissions(declared: list[str], grant: Permissions) -> list[str]:
    """What plugin.json asks for that config.json does not grant; a name no permission has is
    plugin.json's own error, said once, not also "withheld" (a newcomer's misspelling got both)."""
    granted = grant.granted()
    return [name for name in declared if name not in granted and name in PERMISSIONS]
