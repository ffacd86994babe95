"""A world of the plugin's own: mount, IPC and UTS namespaces, and a root built from a list of steps.

As bubblewrap and nsjail do it: the host writes the plan (protocol.MountOp, in order), the worker,
still root, carries it out on an empty tmpfs and pivots into it. Afterwards the plugin's file
system holds only what the plan named: the interpreter and the worker runtime read-only, its own
directory and environment read-only, its data directory and a private /tmp writable, a /proc of
its own PID namespace. Other plugins' files, the host's site-packages and every pathname socket
outside simply do not exist for it, so stat(), inotify and sendto() on them find nothing; its SysV
IPC objects live and die with its IPC namespace.

Sources are opened one path component at a time without following symlinks, and bound through
that descriptor: a component swapped for a symlink (by a plugin that can write a granted
directory, say) makes the step fail instead of binding whatever the link points at.
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
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}


class NamespaceError(Exception):
    """A namespace could not be entered or a step of the root failed; says which and why."""


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


def build_root(spec: p.SandboxSpec, disk_fd: int = -1) -> None:
    """Carry out spec.mounts on a tmpfs at spec.root_dir, then make it the root and go to spec.cwd."""
    root = spec.root_dir
    try:
        linux.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for op in spec.mounts:
            _STEPS[op.kind](root, op, disk_fd)
        # Last, what was left writable for mount points to be made in: the root, and the empty
        # directories laid over the host's packages.
        for op in spec.mounts:
            if op.kind == "hide" and os.path.ismount(root + op.target):
                linux.mount(None, root + op.target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        linux.mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(root)
        linux.pivot_root(".", ".")  # the old root is stacked on the new one: detach it
        linux.umount2(".", MNT_DETACH)
        os.chdir(spec.cwd or "/")
    except OSError as exc:
        raise NamespaceError(str(exc)) from None


# ---- the steps ---------------------------------------------------------------------------------

def _bind(root: str, op: p.MountOp, flags: int) -> None:
    fd = _open_without_symlinks(op.source)
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        target = _mountpoint(root, op.target, is_dir)
        linux.mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    finally:
        os.close(fd)
    linux.mount(None, target, None, MS_REMOUNT | MS_BIND | flags)


def _ro(root: str, op: p.MountOp, disk_fd: int) -> None:
    _bind(root, op, MS_RDONLY | MS_NOSUID | MS_NODEV)


def _rw(root: str, op: p.MountOp, disk_fd: int) -> None:
    _bind(root, op, MS_NOSUID | MS_NODEV)


def _data(root: str, op: p.MountOp, disk_fd: int) -> None:
    if disk_fd < 0:
        _bind(root, op, MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return
    target = _mountpoint(root, op.target, True)
    clone = linux.open_tree(disk_fd)  # the launcher keeps the disk; each worker gets a copy of it
    try:
        linux.move_mount(clone, target)
    finally:
        os.close(clone)


def _tmpfs(root: str, op: p.MountOp, disk_fd: int) -> None:
    target = _mountpoint(root, op.target, True)
    linux.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={op.size},mode=1777")


def _hide(root: str, op: p.MountOp, disk_fd: int) -> None:
    target = root + op.target
    if os.path.isdir(target):  # only where a bind above brought it in; made read-only at the end
        linux.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")


def _proc(root: str, op: p.MountOp, disk_fd: int) -> None:
    # Mounted from inside the worker's PID namespace, it lists the plugin's own processes only.
    linux.mount("proc", _mountpoint(root, op.target, True), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _devices(root: str, op: p.MountOp, disk_fd: int) -> None:
    dev = _mountpoint(root, op.target, True)
    linux.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(f"/dev/{name}", node, None, MS_BIND)
        linux.mount(None, node, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    shm = os.path.join(dev, "shm")
    os.mkdir(shm)
    linux.mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={op.size},mode=1777")
    linux.mount(None, dev, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _file(root: str, op: p.MountOp, disk_fd: int) -> None:
    fd = os.open(_mountpoint(root, op.target, False), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, op.text.encode())
    finally:
        os.close(fd)


def _symlink(root: str, op: p.MountOp, disk_fd: int) -> None:
    os.symlink(op.text, root + op.target)


_STEPS = {"ro": _ro, "rw": _rw, "data": _data, "tmpfs": _tmpfs, "hide": _hide,
          "proc": _proc, "devices": _devices, "file": _file, "symlink": _symlink}


# ---- helpers -----------------------------------------------------------------------------------

def _mountpoint(root: str, target: str, is_dir: bool) -> str:
    """Make `target` exist inside the new root (on its tmpfs, or already inside a bind above)."""
    path = root + target
    try:
        if is_dir:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return _mountpoint(root, target, is_dir)
    return path


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # the generic table: one number everywhere (Linux 5.6)
RESOLVE_NO_SYMLINKS = 0x04
_openat2_works = True


def _open_without_symlinks(path: str) -> int:
    """An O_PATH descriptor for `path`, refusing if any component of it is a symlink."""
    global _openat2_works
    if _openat2_works:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
        fd = linux.libc.syscall(SYS_OPENAT2, linux.AT_FDCWD, os.fsencode(path), ctypes.byref(how),
                                ctypes.sizeof(how))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code == errno.ELOOP:
            raise OSError(code, f"{path}: goes through a symbolic link; the sandbox binds real paths only")
        if code != errno.ENOSYS:
            raise OSError(code, f"{path}: {os.strerror(code)}")
        _openat2_works = False
    return _walk_without_symlinks(path)


def _walk_without_symlinks(path: str) -> int:
    """openat2's RESOLVE_NO_SYMLINKS by hand, a component at a time (kernels before 5.6)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [c for c in path.split("/") if c]:
            if part == "..":
                raise OSError(errno.EINVAL, f"{path}: '..' in a sandbox path")
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, f"{path}: {part} is a symbolic link; the sandbox binds real paths only")
    except BaseException:
        os.close(fd)
        raise
    return fd
