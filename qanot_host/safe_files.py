"""Reading a file that someone other than the host may control: a plugin's plugin.json and code, the
workspace files plugins' places sit beside, an operator's secret file.

One way to do it, because each way of getting it wrong has been tried on us: a symlink at the end
is refused (O_NOFOLLOW), so is anything but a regular file (a FIFO would block, a device never
end: O_NONBLOCK opens it without waiting), and no more than `limit` bytes are ever read.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["read_regular_file", "open_regular_file", "unsafe_directory"]


def open_regular_file(path: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """A descriptor of the file and its stat, for a caller that streams it. OSError with a reason a
    person can act on: ELOOP (a symlink), ENOENT, EINVAL ("not a regular file")."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular_file(path: str, limit: int, dir_fd: int | None = None) -> bytes:
    """The file's bytes. OSError with a reason a person can act on: ELOOP (a symlink), ENOENT,
    EINVAL ("not a regular file"), EFBIG (over `limit`)."""
    fd, info = open_regular_file(path, dir_fd)
    try:
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, over the {limit} read")
        data = os.read(fd, limit + 1)
        if len(data) > limit:  # it grew meanwhile
            raise OSError(errno.EFBIG, f"over the {limit} bytes read")
        return data
    finally:
        os.close(fd)


def unsafe_directory(path: str) -> str | None:
    """Why a directory the host writes as its own user is not the host's alone, if it is not
    (state_dir holds what the host runs and trusts: the workers' import root, environments, the
    control socket; a log directory, what it appends to and rotates): whoever else can write it, or
    replace a directory on the way to it, could plant code the host runs as root (a state_dir another
    user made in /tmp did just that), or point the host's writes at a file of root's. Each directory
    on the way must be root's or this user's, and writable by no one else unless sticky (as /tmp is);
    a symlink on the way, root's or this user's; the directory itself writable by no one else at all.
    A part not made yet is fine: this user makes it, in what is above it."""
    euid = os.geteuid()
    trusted = (0, euid)
    pending = [part for part in os.path.abspath(path).split("/") if part]
    current = "/"
    problem = _unsafe_part("/", os.stat("/"), trusted, euid, last=not pending)
    links = 0
    while pending and not problem:
        # each part as the kernel resolves it, symlinks and the parts of their targets included: a
        # root-owned link may lead through another user's link, which a walk of the path as written
        # and of its real path would both miss
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)  # `current` holds no symlink: this is its real parent
            continue
        candidate = os.path.join(current, part)
        try:
            info = os.lstat(candidate)
        except OSError:
            return None  # not there yet: this user makes it, in what is above it (checked)
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in trusted:
                return f"is not safe: {candidate} is a symlink of uid {info.st_uid}'s, who could point it anywhere"
            links += 1
            if links > 40:
                return f"is not safe: more than 40 symlinks on the way to {path}"
            target = os.readlink(candidate)
            pending[:0] = [p for p in target.split("/") if p]
            if target.startswith("/"):
                current = "/"
            continue
        problem = _unsafe_part(candidate, info, trusted, euid, last=not pending)
        current = candidate
    return problem


def _unsafe_part(where: str, info: os.stat_result, trusted: tuple[int, int], euid: int, last: bool) -> str | None:
    if info.st_uid not in trusted:
        return (f"is not safe: {where} belongs to uid {info.st_uid}, not to root or this user (uid {euid}): "
                "they could replace what the host makes, writes or runs there")
    if info.st_mode & 0o022 and (last or not info.st_mode & stat.S_ISVTX):
        return (f"is not safe: {where} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): they "
                "could replace what the host makes, writes or runs there (use a directory only you can "
                "write to)")
    return None
