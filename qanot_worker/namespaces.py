"""A world of the plugin's own: mount, IPC and UTS namespaces, and a root built from a list of steps.

As bubblewrap and nsjail do it: the host writes the plan (protocol.MountOp, in order), the worker,
still root, carries it out on an empty tmpfs and pivots into it. Afterwards the plugin's file
system holds only what the plan named: the interpreter and the worker runtime read-only, its own
directory and environment read-only, its data directory and a private /tmp writable, a /proc of
its own PID namespace. Other plugins' files, the host's site-packages and every pathname socket
outside simply do not exist for it, so stat(), inotify and sendto() on them find nothing; its SysV
IPC objects live and die with its IPC namespace.

No step follows a symlink, since any directory a plugin can write may hold one by the time the
next worker is built: sources are opened with openat2(RESOLVE_NO_SYMLINKS) and bound through that
descriptor; mount points and files inside the new root are reached from the root's own descriptor
(RESOLVE_BENEATH, no symlinks), and the files the plan writes (/etc/passwd) must land on the
root's own tmpfs, never on something bound there. A step that cannot be carried out fails the
whole root: a worker never runs in a half-built one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from . import linux
from . import protocol as p

__all__ = ["enter_namespaces", "build_root", "NamespaceError"]

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# The devices of a worker's /dev, by their numbers (fixed by the kernel: Documentation/admin-guide/devices.txt)
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
PROC_MASKED_DIRS = ("fs",)  # ext4's and jbd2's figures per device, every plugin's disk among them
PROC_MASKED_FILES = ("diskstats", "partitions")  # every device's reads and writes, and sizes
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}
SYS_OPENAT2 = 437  # the generic table: one number everywhere (Linux 5.6)
RESOLVE_NO_XDEV, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x04, 0x08


class NamespaceError(Exception):
    """A namespace could not be entered or a step of the root failed; says which and why."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = linux.libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        why = "it goes through a symbolic link: the sandbox binds real paths only" if code == errno.ELOOP else \
            os.strerror(code)
        raise OSError(code, f"{path}: {why}")
    return fd


def enter_namespaces(network: bool) -> None:
    """New mount, IPC and UTS namespaces (and a network namespace unless `network`), with no mount
    event propagating back to the host."""
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
    if not network:
        flags |= linux.CLONE_NEWNET
    try:
        linux.unshare(flags)
        linux.mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise NamespaceError(str(exc)) from None


def build_root(spec: p.SandboxSpec, disk_fd: int = -1) -> list[str]:
    """Carry out spec.mounts on a tmpfs at spec.root_dir, then make it the root and go to spec.cwd.
    Returns warnings (a granted path that is not there); raises NamespaceError for anything else."""
    try:
        linux.mount("tmpfs", spec.root_dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        root = _Root(spec.root_dir)
        try:
            for op in spec.mounts:
                _STEPS[op.kind](root, op, disk_fd)
            # Last, what was left writable for mount points to be made in: the root, and the empty
            # directories laid over the host's packages.
            for target in root.hidden:
                linux.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        finally:
            root.close()
        linux.mount(None, spec.root_dir, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(spec.root_dir)
        linux.pivot_root(".", ".")  # the old root is stacked on the new one: detach it
        linux.umount2(".", MNT_DETACH)
        os.chdir(spec.cwd or "/")
    except OSError as exc:
        raise NamespaceError(str(exc)) from None
    return root.warnings


class _Root:
    """The new root while it is built: every path in it is reached from its descriptor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.hidden: list[str] = []
        self.warnings: list[str] = []
        self._fds: list[int] = []

    def close(self) -> None:
        for fd in (*self._fds, self.fd):
            os.close(fd)

    def point(self, target: str, is_dir: bool) -> str:
        """Make `target` exist inside the new root (on its tmpfs, or already inside a bind above)
        without following any symlink; returns a path naming exactly it, for mount(2)."""
        return f"/proc/self/fd/{self.point_fd(target, is_dir)}"

    def point_fd(self, target: str, is_dir: bool) -> int:
        """point(), as a descriptor (kept open until the root is built)."""
        parent_fd, fd = self.point_and_parent(target, is_dir)
        os.close(parent_fd)
        self._fds.append(fd)
        return fd

    def point_and_parent(self, target: str, is_dir: bool) -> tuple[int, int]:
        """Descriptors of the directory `target` is in and of `target` itself, made where missing
        (no symlink followed): the caller closes both."""
        relative = target.lstrip("/")
        parent, _, name = relative.rpartition("/")
        parent_fd = self._directory(parent)
        try:
            try:
                if is_dir:
                    os.mkdir(name, 0o755, dir_fd=parent_fd)
                else:
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644,
                                     dir_fd=parent_fd))
            except FileExistsError:
                pass
            return parent_fd, _openat2(parent_fd, name, os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        except BaseException:
            os.close(parent_fd)
            raise

    def exists(self, target: str, directory: bool = True) -> bool:
        try:
            os.close(_openat2(self.fd, target.lstrip("/"), os.O_PATH | (os.O_DIRECTORY if directory else 0),
                              RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS))
            return True
        except OSError:
            return False

    def write_file(self, target: str, text: str) -> None:
        """On the root's own tmpfs only (RESOLVE_NO_XDEV): never into something bound there."""
        relative = target.lstrip("/")
        parent, _, name = relative.rpartition("/")
        parent_fd = self._directory(parent)
        try:
            fd = _openat2(parent_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                          RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV, 0o644)
        finally:
            os.close(parent_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def symlink(self, target: str, points_to: str) -> None:
        parent, _, name = target.lstrip("/").rpartition("/")
        parent_fd = self._directory(parent)
        try:
            os.symlink(points_to, name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def _directory(self, relative: str) -> int:
        """An O_PATH descriptor of a directory under the root, made (0755) where missing."""
        fd = os.dup(self.fd)
        try:
            for part in filter(None, relative.split("/")):
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = _openat2(fd, part, os.O_PATH | os.O_DIRECTORY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


# ---- the steps ---------------------------------------------------------------------------------

def _bind(root: _Root, op: p.MountOp, flags: int) -> None:
    try:
        fd = _openat2(linux.AT_FDCWD, op.source, os.O_PATH, RESOLVE_NO_SYMLINKS)
    except FileNotFoundError:
        root.warnings.append(f"{op.source} is granted but does not exist: not in the plugin's root")
        return
    held = [fd]
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        parent_fd, point = root.point_and_parent(op.target, is_dir)
        held += [parent_fd, point]
        linux.mount(f"/proc/self/fd/{fd}", f"/proc/self/fd/{point}", None, MS_BIND)
        # The last part looked up again (no symlink, beneath the root) in the directory held since the
        # first walk, not from the root: the path now leads to the new mount's root, which a remount takes.
        mounted = _openat2(parent_fd, op.target.rpartition("/")[2], os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        held.append(mounted)
        linux.mount(None, f"/proc/self/fd/{mounted}", None, MS_REMOUNT | MS_BIND | flags)
    finally:
        for each in held:
            os.close(each)


def _ro(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    _bind(root, op, MS_RDONLY | MS_NOSUID | MS_NODEV)


def _rw(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    # noexec: nothing a plugin writes runs, not even through the ELF loader (which maps, not execs)
    _bind(root, op, MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _data(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    if disk_fd < 0:
        _bind(root, op, MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return
    target = root.point_fd(op.target, True)
    clone = linux.open_tree(disk_fd)  # the launcher keeps the disk; each worker gets a copy of it
    try:
        linux.move_mount(clone, target)
    finally:
        os.close(clone)


def _tmpfs(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    linux.mount("tmpfs", root.point(op.target, True), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                f"size={op.size},mode=1777")


def _hide(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    if root.exists(op.target):  # only where a bind above brought it in; made read-only at the end
        linux.mount("tmpfs", root.point(op.target, True), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "size=64k,mode=0755")
        root.hidden.append(root.point(op.target, True))  # the tmpfs now at that path


def _proc(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    # Mounted from inside the worker's PID namespace, it lists the plugin's own processes only.
    proc = op.target.rstrip("/")
    # An empty directory of the root's own, beneath where proc goes (so nobody sees it): what masks
    # a directory of proc, bound there (a tmpfs each would cost a superblock per worker)
    empty = root.point_fd(f"{proc}/.masked", True)
    # and an empty file, what masks a file of it: the host's /dev/null, bound there, was one inode with
    # the host's and every plugin's /dev/null, and inotify on it told of their opens and writes (review 68)
    empty_file = root.point_fd(f"{proc}/.masked-file", False)
    # hidepid: a process the plugin may not trace is not there at all. Its init (PID 1), which made
    # itself non-dumpable, stays in the host's network and mount namespaces, and /proc/1/net and
    # /proc/1/mountinfo, which no ptrace check guards, told of the host's connections and mounts.
    linux.mount("proc", root.point(proc, True), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    # What it says of every block device and file system is the machine's, not the namespace's:
    # other plugins' disks, how full they are and how busy (a neighbour's writes, live). Masked.
    for name in PROC_MASKED_DIRS:
        if root.exists(f"{proc}/{name}"):
            linux.mount(f"/proc/self/fd/{empty}", root.point(f"{proc}/{name}", True), None, MS_BIND)
            root.hidden.append(root.point(f"{proc}/{name}", True))  # the bind, made read-only at the end
    for name in PROC_MASKED_FILES:
        if root.exists(f"{proc}/{name}", directory=False):  # reads as empty
            linux.mount(f"/proc/self/fd/{empty_file}", root.point(f"{proc}/{name}", False), None, MS_BIND)
            root.hidden.append(root.point(f"{proc}/{name}", False))  # the bind, made read-only at the end


def _devices(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    linux.mount("tmpfs", root.point(op.target, True), "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    dev = op.target.rstrip("/")
    dev_fd = root.point_fd(dev, True)  # the new tmpfs's root
    refused = ""
    for name, (major, minor) in DEVICES.items():
        # Made on the tmpfs (noexec, nosuid, read-only at the end), as container runtimes do: two
        # system calls where a bind of the host's node and its remount were two mounts and two
        # walks from the root (0.45 ms of every start for the five). Where mknod is refused (root
        # without CAP_MKNOD, in a container; a device cgroup; a kernel such as gVisor) the host's
        # are bound. (Made so, a node has the tmpfs's SELinux label, not the device's.)
        if not refused:
            try:
                os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev_fd)
                os.chmod(name, 0o666, dir_fd=dev_fd)  # mknod's mode went through the umask: 0666, as the host's
                continue
            except OSError as exc:
                refused = exc.strerror or type(exc).__name__
                root.warnings.append(f"its /dev holds the host's device nodes, bound (mknod: {refused}): inotify "
                                     "on them sees every process's opens and writes of them")
        linux.mount(f"/dev/{name}", root.point(f"{dev}/{name}", False), None, MS_BIND)
        linux.mount(None, root.point(f"{dev}/{name}", False), None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    for name, points_to in DEV_LINKS.items():
        root.symlink(f"{dev}/{name}", points_to)
    linux.mount("tmpfs", root.point(f"{dev}/shm", True), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                f"size={op.size},mode=1777")
    linux.mount(None, root.point(dev, True), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _file(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    root.write_file(op.target, op.text)


def _symlink(root: _Root, op: p.MountOp, disk_fd: int) -> None:
    root.symlink(op.target, op.text)


_STEPS = {"ro": _ro, "rw": _rw, "data": _data, "tmpfs": _tmpfs, "hide": _hide, "proc": _proc,
          "devices": _devices, "file": _file, "symlink": _symlink}
