"""A cgroup per plugin, in every controller the kernel offers: the kernel-enforced ceilings.

- pids: at most pids_max processes and threads, so a fork bomb stops there (RLIMIT_NPROC does
  nothing for root);
- memory: a hard ceiling (page cache, tmpfs and SysV shared memory included); over it, the kernel's
  OOM killer ends the worker and the host says so;
- cpu: a weight (and optionally a quota), so a plugin spinning every core cannot starve the host or
  its neighbours;

Groups live under a base named qanot-host-PID inside the host's own cgroup of each hierarchy, so an
operator's limits on the host (a systemd unit's MemoryMax, say) still cover its plugins. The worker
template puts each worker in its groups before any plugin code runs, and removes them if the host
dies; a host at start removes what hosts that are gone left behind.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import re
import signal
import time
from dataclasses import dataclass

__all__ = ["Cgroups", "CgroupLimits", "sweep_stale_cgroups"]

log = logging.getLogger("qanot_host.cgroups")

# controller -> the sandbox layer it is (cpuacct only counts: the plugin's CPU time, children included)
V1_CONTROLLERS = {"pids": "pids-cgroup", "memory": "memory-cgroup", "cpu": "cpu-cgroup", "cpuacct": "cpu-accounting"}
CGROUP_LAYERS = ("pids-cgroup", "memory-cgroup", "cpu-cgroup")
V2_CONTROLLERS = ("pids", "memory", "cpu")
BASE_PREFIX = "qanot-host-"
KILL_SECONDS = 5.0


@dataclass(frozen=True)
class CgroupLimits:
    pids_max: int
    memory_bytes: int | None  # None: no ceiling of ours
    cpu_weight: int  # 1..10000, 100 is the default share (cgroup v2's scale)
    cpu_max: float | None  # cores; None: no quota


class Cgroups:
    """The cgroups of one host process."""

    def __init__(self, mounts: dict[str, str] | None = None) -> None:
        self._hierarchies = _hierarchies() if mounts is None else mounts  # controller -> base parent dir
        self._v2 = "" in self._hierarchies
        self._base: dict[str, str] = {}  # controller (or "" on v2) -> the host's base group
        self._made: dict[str, None] = {}  # every group this host used, each after its parent (an ordered set)
        self._open_files: dict[str, int] = {}  # plugin -> its cpuacct.usage, kept open (cpu_seconds)
        self._applied: dict[str, CgroupLimits] = {}  # group -> the limits last written there
        self.problem = "" if self._hierarchies else "no writable cgroup hierarchy (not root, or no cgroups)"

    @property
    def available(self) -> bool:
        return bool(self._hierarchies)

    def prepare(self, plugin: str, limits: CgroupLimits) -> dict[str, str]:
        """Make (or reset) the plugin's groups; returns layer name -> cgroup.procs to join, "" for a
        layer that could not be had (the worker reports it missing)."""
        groups = dict.fromkeys(CGROUP_LAYERS, "")
        for controller in self._hierarchies:
            try:
                group = self._group(controller, plugin)
                if self._applied.get(group) != limits:  # only root writes these files: what was set stays set
                    _apply(controller, group, limits)
                    self._applied[group] = limits
            except OSError as exc:
                log.warning("plugin %s: no %s cgroup (%s)", plugin, controller or "v2", exc.strerror or exc)
                continue
            procs = os.path.join(group, "cgroup.procs")
            if controller == "":
                groups.update(dict.fromkeys(CGROUP_LAYERS, procs))
            else:
                groups[V1_CONTROLLERS[controller]] = procs
        return groups

    def usage(self, plugin: str) -> tuple[float | None, float | None]:
        """(anonymous and shared memory in MB, CPU seconds) of the plugin's whole group, its children
        and memfds included; None for what this machine's cgroups do not count."""
        memory = None
        base = self._base.get("memory") or self._base.get("")
        if base is not None:
            stat = _read(os.path.join(base, plugin, "memory.stat"))
            fields = dict(line.split() for line in stat.splitlines() if len(line.split()) == 2)
            keys = ("total_rss", "total_shmem") if "total_rss" in fields else ("anon", "shmem")
            if all(k in fields for k in keys):
                memory = sum(int(fields[k]) for k in keys) / 2**20
        return memory, self.cpu_seconds(plugin)

    def cpu_seconds(self, plugin: str) -> float | None:
        """CPU time the plugin's group has used, its children included. Read every second for every
        plugin (limits_watch.py), so from a descriptor kept open: a pread costs 1 µs here, an
        open/read/close 30 µs (500 plugins: 1.5% of a core, for this alone); and the kept one is
        read before anything else is made (the path, the text): 6-10 µs a read, 1 µs of it the
        pread, when the path was joined and the text decoded and checked every time."""
        fd = self._open_files.get(plugin)
        if fd is not None:
            try:
                return int(os.pread(fd, 64, 0)) / 1e9
            except (OSError, ValueError):
                pass  # the group was removed (and maybe made again), or not a number: the slow way
        if "cpuacct" in self._base:
            text = self._pread(plugin, os.path.join(self._base["cpuacct"], plugin, "cpuacct.usage")).strip()
            return int(text) / 1e9 if text.isdigit() else None
        if "" in self._base:
            stat = _read(os.path.join(self._base[""], plugin, "cpu.stat"))
            usec = next((line.split()[1] for line in stat.splitlines() if line.startswith("usage_usec ")), None)
            return int(usec) / 1e6 if usec else None
        return None

    def _pread(self, plugin: str, path: str) -> str:
        for _ in range(2):
            fd = self._open_files.get(plugin)
            if fd is None:
                try:
                    fd = self._open_files[plugin] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return ""
            try:
                return os.pread(fd, 64, 0).decode()
            except OSError as exc:  # the group was removed (and maybe made again): open it anew
                self._forget(plugin, exc)
        return ""

    def _forget(self, plugin: str, failed: OSError | None = None) -> None:
        """Close the plugin's kept descriptor, unless something closed it under us (EBADF: a bug
        elsewhere, logged; the number may be another's by now, so it is not closed again)."""
        fd = self._open_files.pop(plugin)
        if failed is None or failed.errno != errno.EBADF:
            try:
                os.close(fd)
                return
            except OSError as exc:
                failed = exc
        if failed.errno == errno.EBADF:
            log.error("plugin %s: the descriptor of its cgroup's CPU time (%d) was closed by someone else", plugin, fd)

    def members(self, plugin: str) -> list[int]:
        pids: set[int] = set()
        for controller in self._base:
            pids.update(_read_pids(os.path.join(self._base[controller], plugin)))
        return sorted(pids)

    def oom_kills(self, plugin: str) -> int:
        """How often the kernel's OOM killer has ended a process of this plugin's group."""
        base = self._base.get("memory") or self._base.get("")
        if base is None:
            return 0
        group = os.path.join(base, plugin)
        text = _read(os.path.join(group, "memory.events")) or _read(os.path.join(group, "memory.oom_control"))
        match = re.search(r"^oom_kill (\d+)", text, re.M)
        return int(match.group(1)) if match else 0

    def memory_bytes(self, plugin: str) -> int | None:
        base = self._base.get("memory") or self._base.get("")
        if base is None:
            return None
        group = os.path.join(base, plugin)
        text = _read(os.path.join(group, "memory.current")) or _read(os.path.join(group, "memory.usage_in_bytes"))
        return int(text) if text.strip().isdigit() else None

    async def kill(self, plugin: str) -> bool:
        """Kill every process of the plugin's groups and wait until they are gone; False if some
        survived KILL_SECONDS (the caller must not start another worker on the same disk then)."""
        # Only groups this host made: a plugin's first start reads nothing (cgroup files are slow to
        # open while other workers are being moved between groups).
        groups = [os.path.join(base, plugin) for base in self._base.values()]
        groups = [group for group in groups if group in self._made]
        deadline = time.monotonic() + KILL_SECONDS
        while any(_read_pids(group) for group in groups):
            if time.monotonic() > deadline:
                return False
            _kill_group(groups)
            await asyncio.sleep(0.005)
        return True

    async def remove(self) -> None:
        """rmdir every group this host used (children first). The kernel refuses (EBUSY) while a
        task that just exited still counts; such a group is tried again for up to KILL_SECONDS."""
        deadline = time.monotonic() + KILL_SECONDS
        for group in reversed(list(self._made)):
            while not _rmdir(group) and os.path.isdir(group) and time.monotonic() < deadline:
                if _read_pids(group):
                    _kill_group([group])
                await asyncio.sleep(0.01)
        self._made.clear()
        self._base.clear()
        self._applied.clear()
        for plugin in list(self._open_files):
            self._forget(plugin)

    def _group(self, controller: str, plugin: str) -> str:
        base = self._base.get(controller)
        if base is None:
            base = os.path.join(self._hierarchies[controller], f"{BASE_PREFIX}{os.getpid()}")
            _mkdir(base)
            self._made.setdefault(base)
            if controller == "":
                _enable_v2_controllers(base)
            self._base[controller] = base
        group = os.path.join(base, plugin)
        if _mkdir(group):
            self._applied.pop(group, None)  # a new group has the kernel's defaults
        self._made.setdefault(group)  # made now, or left by an earlier host of this process: ours to remove
        return group


def sweep_stale_cgroups() -> list[str]:
    """Kill what is left in, and remove, the groups of qanot-host processes that no longer run."""
    removed = []
    for parent in set(_hierarchies(require_writable=True).values()):
        for base in glob.glob(os.path.join(parent, f"{BASE_PREFIX}*")):
            pid = re.match(r"\d+", os.path.basename(base)[len(BASE_PREFIX):])
            if pid is None or os.path.exists(f"/proc/{pid.group()}") or not os.path.isdir(base):
                continue
            groups = [g for g in glob.glob(os.path.join(base, "*")) if os.path.isdir(g)]
            deadline = time.monotonic() + KILL_SECONDS
            while any(_read_pids(g) for g in groups) and time.monotonic() < deadline:
                for group in groups:
                    for member in _read_pids(group):
                        _signal(member)
                time.sleep(0.01)
            for group in groups:
                _rmdir(group)
            if _rmdir(base):
                removed.append(base)
    return removed


# ---- the kernel's files ------------------------------------------------------------------------

def _hierarchies(require_writable: bool = True) -> dict[str, str]:
    """controller -> the directory our base groups go in (the host's own cgroup there); "" is v2."""
    own = _own_cgroups()
    found: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, fstype_fields = left.split(), right.split()
        if len(fields) < 5 or len(fstype_fields) < 3:
            continue
        mountpoint, fstype, options = fields[4], fstype_fields[0], fstype_fields[2].split(",")
        if fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options and controller in own and controller not in found:
                    found[controller] = mountpoint + own[controller].rstrip("/")
        elif fstype == "cgroup2" and "" in own and _v2_has_controllers(mountpoint):
            found.setdefault("", mountpoint + own[""].rstrip("/"))
    if any(c in found for c in V1_CONTROLLERS):
        found.pop("", None)  # hybrid: the v1 controllers are the ones that work
    if require_writable:
        found = {c: d for c, d in found.items() if os.access(d, os.W_OK)}
    return found


def _own_cgroups() -> dict[str, str]:
    own: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _v2_has_controllers(mountpoint: str) -> bool:
    return bool(set(V2_CONTROLLERS) & set(_read(os.path.join(mountpoint, "cgroup.controllers")).split()))


def _enable_v2_controllers(base: str) -> None:
    parent = os.path.dirname(base)
    wanted = [c for c in V2_CONTROLLERS if c in _read(os.path.join(parent, "cgroup.controllers")).split()]
    for where in (parent, base):
        try:
            _write(os.path.join(where, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
        except OSError:
            pass  # the host's own group has processes in it: the controllers stay as they are


def _apply(controller: str, group: str, limits: CgroupLimits) -> None:
    if controller == "pids":
        _write(os.path.join(group, "pids.max"), str(limits.pids_max))
    elif controller == "memory":
        value = str(limits.memory_bytes) if limits.memory_bytes else "-1"
        try:  # v1 counts socket buffers only once a TCP limit is set (v2 always counts them)
            _write(os.path.join(group, "memory.kmem.tcp.limit_in_bytes"), value)
        except OSError:
            pass
        memory = os.path.join(group, "memory.limit_in_bytes")
        swap = os.path.join(group, "memory.memsw.limit_in_bytes")  # memory and swap together
        if not os.path.exists(swap):
            _write(memory, value)
            return
        try:  # the kernel keeps memsw >= limit: lower the limit first, raise memsw first
            _write(memory, value)
            _write(swap, value)
        except OSError:
            _write(swap, value)
            _write(memory, value)
    elif controller == "cpu":
        _write(os.path.join(group, "cpu.shares"), str(max(2, limits.cpu_weight * 1024 // 100)))
        period = 100_000
        _write(os.path.join(group, "cpu.cfs_period_us"), str(period))
        _write(os.path.join(group, "cpu.cfs_quota_us"), str(int(limits.cpu_max * period)) if limits.cpu_max else "-1")
    elif controller == "":
        for name, value in (("pids.max", str(limits.pids_max)),
                            ("memory.max", str(limits.memory_bytes) if limits.memory_bytes else "max"),
                            ("memory.swap.max", "0" if limits.memory_bytes else "max"),
                            ("cpu.weight", str(limits.cpu_weight)),
                            ("cpu.max", f"{int(limits.cpu_max * 100_000)} 100000" if limits.cpu_max else "max 100000")):
            if os.path.exists(os.path.join(group, name)):
                _write(os.path.join(group, name), value)


def _kill_group(groups: list[str]) -> None:
    """SIGKILL every member (cgroup v2's cgroup.kill does it at once). With a PID namespace per
    worker, killing its init would end them all; this is for what is left when there is none."""
    kill_file = [os.path.join(g, "cgroup.kill") for g in groups if os.path.exists(os.path.join(g, "cgroup.kill"))]
    if kill_file:
        _write(kill_file[0], "1")
        return
    for group in groups:
        for member in _read_pids(group):
            _signal(member)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _read_pids(group: str) -> list[int]:
    return [int(line) for line in _read(os.path.join(group, "cgroup.procs")).split()]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mkdir(path: str) -> bool:
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False
