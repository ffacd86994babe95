"""The few Linux system calls the worker needs and Python 3.11's os module lacks, through libc.

Each wrapper raises OSError with the call's name on failure, so a sandbox layer that cannot be had
says which call refused and why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select

__all__ = [
    "libc", "check", "mount", "umount2", "unshare", "setns", "pivot_root", "prctl", "open_tree",
    "move_mount", "parent_alive", "bare_fork", "CLONE_NEWNS", "CLONE_NEWIPC", "CLONE_NEWUTS", "CLONE_NEWNET",
    "CLONE_NEWPID", "PR_SET_PDEATHSIG", "PR_SET_DUMPABLE", "PR_SET_NO_NEW_PRIVS", "PR_SET_NAME",
]

libc = ctypes.CDLL(None, use_errno=True)
_fork_holding_the_gil = ctypes.PyDLL(None, use_errno=True).fork
_fork_holding_the_gil.restype = ctypes.c_int

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_NO_NEW_PRIVS = 1, 4, 15, 38
# The new mount API has one number on every architecture (the generic table, Linux 5.2).
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(os.uname().machine, 155)
OPEN_TREE_CLONE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 1, 0x1000, 0x4, 0x40
AT_FDCWD = -100


def check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _c(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data)),
          f"mount {fstype or source or ''} on {target}")


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(_c(target), flags), f"umount {target}")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, kind: int) -> None:
    check(libc.setns(fd, kind), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    check(libc.syscall(SYS_PIVOT_ROOT, _c(new_root), _c(put_old)), "pivot_root")


def bare_fork() -> int:
    """fork(2) without CPython's work around it, for a child that runs a few lines of ours and
    leaves by os._exit (a PID namespace's init). os.fork() reinitialises the interpreter's locks and
    runs every at-fork hook (threading's, logging's, random's reseed...) in both processes, writing
    to ~100 pages of each that are then copied: ~0.8 ms of the machine's CPU for every worker started.
    None of it is needed where nothing can hold a lock: a parent with one thread, whose GIL is held
    across the call (PyDLL), so the child's one thread has it. With more threads, os.fork()."""
    if _threads() != 1:
        return os.fork()
    return check(_fork_holding_the_gil(), "fork")


def _threads() -> int:
    try:
        with open("/proc/self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])
    except (OSError, ValueError, IndexError):
        return 0


def prctl(option: int, arg: int = 0) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def open_tree(fd: int) -> int:
    """A detached copy of the mount `fd` refers to (which may itself be detached)."""
    return check(libc.syscall(SYS_OPEN_TREE, fd, b"", OPEN_TREE_CLONE | AT_EMPTY_PATH | os.O_CLOEXEC),
                 "open_tree")


def move_mount(fd: int, target_fd: int) -> None:
    """Attach the detached mount `fd` on the directory `target_fd` refers to."""
    check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", target_fd, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
          "move_mount")


def parent_alive(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    if pidfd < 0:
        return True
    try:
        return not select.select([pidfd], [], [], 0)[0]
    except OSError as exc:
        return exc.errno != errno.EBADF
